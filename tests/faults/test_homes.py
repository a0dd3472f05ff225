"""A read-only home and a full home (a small tmpfs; mounts need root, otherwise skipped with the reason).

Read-only: reading commands work, a stage that would write fails with one line and changes
nothing. Full: the stage says the disk is full (`no space left on <path>`), and once there is
room the same command resumes and ends with the uninterrupted run's adapter.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from faults.harness import copy_without, latest, looper, one_line_error, same_weights, stage_root, tree

pytestmark = pytest.mark.slow


def mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount here ({proc.stderr.strip() or 'mount failed'}): needs root in a namespace that allows mounts"
        )


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_home(reference, tmp_path):
    ref_home, _ = reference
    home = copy_without(ref_home, tmp_path / "home", "ppo")
    view = tmp_path / "ro"
    view.mkdir()
    mount("--bind", str(home), str(view))
    try:
        mount("-o", "remount,ro,bind", str(view))
        yield view
    finally:
        unmount(view)


def test_read_only_home(read_only_home, ledger):
    before = tree(read_only_home)
    assert looper(read_only_home, "status").code == 0
    assert looper(read_only_home, "verify").code == 0
    ledger["bad_inputs_tried"] += 1
    result = looper(read_only_home, "ppo", "--rollouts", "graded000000")
    clean = one_line_error(result) and tree(read_only_home) == before
    ledger["bad_inputs_one_line_clean"] += clean
    assert one_line_error(result), result.err[-2000:]
    assert "read-only" in result.err.lower(), result.err
    assert tree(read_only_home) == before


@pytest.fixture
def full_home(reference, tmp_path):
    """A tmpfs holding the reference's prepare and a little room: too little for sft's checkpoints."""
    ref_home, versions = reference
    home = tmp_path / "full"
    home.mkdir()
    size = lambda path: sum(f.stat().st_size for f in path.rglob("*") if f.is_file())  # noqa: E731
    # room for about one trainer checkpoint (adapter + tokenizer + optimizer state), not for two
    room = 4 * size(stage_root(ref_home, "sft") / versions["sft"])
    mount("-t", "tmpfs", "-o", f"size={size(ref_home / 'data' / 'prepare') + room}", "tmpfs", str(home))
    try:
        shutil.copytree(ref_home / "data" / "prepare", home / "data" / "prepare")
        yield home
    finally:
        unmount(home)


def test_full_home_says_so_and_resumes(full_home, reference, ledger):
    ref_home, versions = reference
    ledger["bad_inputs_tried"] += 1
    result = looper(full_home, "sft")
    ledger["bad_inputs_one_line_clean"] += one_line_error(result) and "no space left on" in result.err
    assert one_line_error(result), result.err[-2000:]
    assert "no space left on" in result.err, result.err
    assert (stage_root(full_home, "sft") / f"{versions['sft']}.partial").is_dir(), "no resumable state left"
    subprocess.run(["mount", "-o", "remount,size=256m", str(full_home)], check=True)
    rerun = looper(full_home, "sft")
    if rerun.code != 0:
        ledger["stuck_resumes"] += 1
    assert rerun.code == 0, rerun.err[-2000:]
    assert latest(full_home, "sft") == versions["sft"]
    assert same_weights(
        stage_root(ref_home, "sft") / versions["sft"], stage_root(full_home, "sft") / versions["sft"]
    )
