"""`python -m looper.regime_w.demo` prints the same table as `looper regime-w demo`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_module_entry_point_matches_the_cli(run_cli):
    code, cli_out, err = run_cli("regime-w", "demo")
    assert code == 0, err
    done = subprocess.run(
        [sys.executable, "-m", "looper.regime_w.demo"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == cli_out
    lines = cli_out.splitlines()
    assert lines[0].split() == ["case", "s_end", "s_path", "s_cf", "s_wm", "reward", "arm", "rewards"]
    assert len(lines) == 2 + 7 and lines[2].startswith("all agree, right")
