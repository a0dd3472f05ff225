"""Issue 22's reproductions that need the tiny model through the real CLI (slow tier).

Each runs `python -m looper` in a subprocess, as a user would, sometimes under the kill hook
(`LOOPER_KILL_AT`, looper/store/faults.py) to die just before a chosen filesystem mutation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipelines" / "tiny-test.toml"


def looper(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOOPER_")}
    environ |= {"LOOPER_HOME": str(home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"} | env
    return subprocess.run(
        [sys.executable, "-m", "looper", "--config", str(PIPELINE), *map(str, args)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("prepared") / "home"
    assert looper(home, "prepare").returncode == 0
    return home


def test_sft_killed_after_its_last_checkpoint_does_not_train_another_step(prepared, tmp_path):
    """Item 1: killed after the final trainer checkpoint (here: while the finished run removes its
    trainer state), the rerun resumed from checkpoint-4 and trained step 5 of --max-steps 4."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    shutil.copytree(prepared, whole)
    shutil.copytree(prepared, killed)
    log = tmp_path / "mutations.log"
    done = looper(whole, "sft", "--json", LOOPER_KILL_LOG=str(log))
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    after_last = next(i for i, line in enumerate(lines) if "checkpoint-4/looper_totals.json" in line)
    point = next(int(line.split()[0]) for line in lines[after_last:] if " os.remove " in line)

    assert looper(killed, "sft", LOOPER_KILL_AT=str(point)).returncode == -9
    rerun = looper(killed, "sft", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert "checkpoint-4 is the last step: training is done" in rerun.stdout
    want, got = (manifest(Path(json.loads(r.stdout.splitlines()[-1])["path"])) for r in (done, rerun))
    assert got["counts"] == want["counts"] and got["counts"]["steps"] == 4
    assert got["hash"] == want["hash"] and got["version"] == want["version"]
