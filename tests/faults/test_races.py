"""Two and three runs of one stage at once: each either finishes, waits (--wait) or says which
run holds the lock; afterwards exactly one complete artifact is published, no `.partial` stays.

The start state is the one issue 12 found unsafe: a rollouts run killed at commit (every shard
and the manifest in `<v>.partial/`, nothing published).
"""

from __future__ import annotations

import re

import pytest

from faults.harness import compare_rows, copy_without, finish, latest, looper, stage_root, start

pytestmark = pytest.mark.slow

HELD = re.compile(r"another looper (\w+) run holds (\S+) \(pid \d+, started [^)]+\)")


def killed_at_commit(reference, tmp_path, stage: str = "rollouts"):
    ref_home, versions = reference
    home = copy_without(ref_home, tmp_path / "home", stage)
    assert looper(home, stage, fault="commit:1").killed
    assert (stage_root(home, stage) / f"{versions[stage]}.partial").is_dir()
    return ref_home, home, versions[stage]


def check_one_artifact(ledger, ref_home, home, stage: str, version: str) -> None:
    assert latest(home, stage) == version
    lost, doubled, same = compare_rows(
        stage, stage_root(ref_home, stage) / version, stage_root(home, stage) / version
    )
    ledger["rows_lost"] += lost
    ledger["rows_doubled"] += doubled
    assert (lost, doubled, same) == (0, 0, True)
    assert not list(stage_root(home, stage).glob("*.partial")), "a .partial was left behind"
    leftovers = [p.name for p in stage_root(home, stage).glob(".*") if p.is_dir()]
    assert not leftovers, f"temp or trash dirs left behind: {leftovers}"


@pytest.mark.parametrize("attempt", range(3))
def test_two_runs_at_once_without_wait(reference, ledger, tmp_path, attempt):
    ref_home, home, version = killed_at_commit(reference, tmp_path)
    ledger["races"] += 1
    results = [finish(p) for p in [start(home, "rollouts"), start(home, "rollouts")]]
    for result in results:
        if result.code != 0:
            assert len(result.error_lines()) == 1 and HELD.search(result.err), result.err[-2000:]
    assert any(r.code == 0 for r in results)
    check_one_artifact(ledger, ref_home, home, "rollouts", version)
    ledger["races_clean"] += 1


def test_three_runs_at_once_with_wait(reference, ledger, tmp_path):
    ref_home, home, version = killed_at_commit(reference, tmp_path)
    ledger["races"] += 1
    results = [finish(p) for p in [start(home, "rollouts", "--wait") for _ in range(3)]]
    assert [r.code for r in results] == [0, 0, 0], [r.err[-1000:] for r in results]
    check_one_artifact(ledger, ref_home, home, "rollouts", version)
    ledger["races_clean"] += 1


def test_three_prepares_from_scratch(reference, ledger, tmp_path):
    """No partial at all: three fresh runs racing to create, fill and commit the same version."""
    ref_home, versions = reference
    home = tmp_path / "fresh"
    ledger["races"] += 1
    results = [finish(p) for p in [start(home, "prepare", "--wait") for _ in range(3)]]
    assert [r.code for r in results] == [0, 0, 0], [r.err[-1000:] for r in results]
    check_one_artifact(ledger, ref_home, home, "prepare", versions["prepare"])
    ledger["races_clean"] += 1
