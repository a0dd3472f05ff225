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


def catalog(home: Path) -> dict:
    """{<stage>/<version>: (content hash, counts)} of every artifact in a home, and the LATEST pointers."""
    held = {}
    for path in sorted(home.glob("*/*/*/manifest.json")):
        m = json.loads(path.read_text())
        held[f"{m['stage']}/{m['version']}"] = (m["hash"], m["counts"])
    for pointer in home.glob("*/*/LATEST"):
        held[f"{pointer.parent.name}/LATEST"] = pointer.read_text().strip()
    return held


LOOP = ["loop", "--rounds", "2", "--no-test-eval", "--dev-limit", "2", "--json"]


def test_a_loop_is_the_same_in_any_home_and_resumes_after_its_home_moves(prepared, tmp_path):
    """Item 2: versions and hashes depended on the home's path (rows stored the --policy path, the
    eval identity the --compare paths); an interrupted loop failed after `mv` (absolute paths in
    rounds.json). Here: one loop run whole in one home; the same loop in a home elsewhere, killed
    halfway, moved, and rerun, must end with the same artifacts."""
    first = tmp_path / "a" / "home"
    shutil.copytree(prepared, first)
    log = tmp_path / "mutations.log"
    done = looper(first, *LOOP, LOOPER_KILL_LOG=str(log))
    assert done.returncode == 0, done.stderr
    want = catalog(first)
    assert any(key.startswith("ppo/") for key in want)

    second = tmp_path / "b" / "deeper" / "home"
    shutil.copytree(prepared, second)
    halfway = len(log.read_text().splitlines()) // 2
    assert looper(second, *LOOP, LOOPER_KILL_AT=str(halfway)).returncode == -9
    moved = tmp_path / "moved"
    second.rename(moved)
    rerun = looper(moved, *LOOP)
    assert rerun.returncode == 0, rerun.stderr
    assert catalog(moved) == want

    # rolling out a policy named by its path gives the rows `--policy sft` gives (rows name sft:<version>)
    sft_dir = first / "checkpoints" / "sft" / (first / "checkpoints" / "sft" / "LATEST").read_text().strip()
    named = looper(first, "rollouts", "--policy", "sft", "--json")
    assert named.returncode == 0, named.stderr
    version = json.loads(named.stdout.splitlines()[-1])["version"]
    by_path = looper(first, "rollouts", "--policy", str(sft_dir), "--force", "--json")
    assert by_path.returncode == 0, by_path.stderr
    assert json.loads(by_path.stdout.splitlines()[-1])["version"] == version
    assert catalog(first)[f"rollouts/{version}"] == want[f"rollouts/{version}"]
