"""SIGKILL every stage at points drawn by a seeded schedule, rerun, compare with the uninterrupted run.

For each stage and each kill point it passes (looper/store/faults.py: step, save, shard, commit), the
schedule draws which pass dies (`LOOPER_FAULT=<point>:<n>`, n from a generator seeded by
LOOPER_FAULT_SEED, default 12, and the stage and point). The killed run must have died there
(exit -9); the plain rerun must finish and publish the same version with the same rows (data
stages: none lost, none doubled) or bit-identical adapter weights (training stages), and the
same content hash.
"""

from __future__ import annotations

import os
import random

import pytest

from faults.harness import (
    DATA_STAGES,
    STAGE_ARGS,
    compare_rows,
    copy_without,
    latest,
    looper,
    manifest,
    same_weights,
    stage_root,
)

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("LOOPER_FAULT_SEED", "12"))
# How many times each stage passes each point with tests/faults/faults.toml: the schedule's range.
PASSES = {
    "prepare": {"shard": 3, "commit": 1},  # train, dev, test tables
    "sft": {"step": 4, "save": 4, "commit": 1},  # 4 steps, a checkpoint after each
    "rollouts": {"shard": 3, "commit": 1},  # 6 questions in shards of 2
    "ppo": {"step": 3, "save": 3, "commit": 1},
    "dpo": {"step": 3, "save": 3, "commit": 1},
    "eval": {"shard": 3, "commit": 1},  # base's and sft's cache chunks, then completions.parquet
}


def schedule(seed: int) -> list[tuple[str, str, int]]:
    """(stage, point, n) for every stage and point: the n-th pass of the point dies."""
    return [
        (stage, point, random.Random(f"{seed}/{stage}/{point}").randint(1, passes))
        for stage, points in PASSES.items()
        for point, passes in points.items()
    ]


@pytest.mark.parametrize(("stage", "point", "n"), schedule(SEED), ids=lambda x: str(x))
def test_kill_and_resume(reference, ledger, tmp_path, stage, point, n):
    ref_home, versions = reference
    home = copy_without(ref_home, tmp_path / "home", stage)
    args = [stage, *STAGE_ARGS.get(stage, [])]
    ledger["kills_injected"] += 1
    killed = looper(home, *args, fault=f"{point}:{n}")
    if not killed.killed:
        ledger["kill_points_not_reached"] += 1
    assert killed.killed, (
        f"LOOPER_FAULT={point}:{n} did not kill {stage} (exit {killed.code}):\n{killed.err[-2000:]}"
    )
    assert not (stage_root(home, stage) / versions[stage]).exists(), "a killed run published its artifact"

    rerun = looper(home, *args)
    if rerun.code != 0:
        ledger["stuck_resumes"] += 1
    assert rerun.code == 0, f"{stage} did not resume after a kill at {point}:{n}:\n{rerun.err[-2000:]}"
    assert latest(home, stage) == versions[stage], "the resumed run made another version"
    want, got = stage_root(ref_home, stage) / versions[stage], stage_root(home, stage) / versions[stage]
    if stage in DATA_STAGES:
        lost, doubled, same = compare_rows(stage, want, got)
        ledger["rows_lost"] += lost
        ledger["rows_doubled"] += doubled
        assert (lost, doubled) == (0, 0)
        assert same, "the resumed run's rows differ from the uninterrupted run's"
    else:
        same = same_weights(want, got)
        if not same:
            ledger["adapters_differ"] += 1
        assert same, "the resumed run's adapter differs from the uninterrupted run's"
    assert manifest(home, stage)["hash"] == manifest(ref_home, stage, versions[stage])["hash"]
    assert not list(stage_root(home, stage).glob("*.partial")), "a .partial was left behind"
    assert not list(got.rglob(".*.tmp")), "a killed write's temp file was published"
    ledger["kills_survived"] += 1
