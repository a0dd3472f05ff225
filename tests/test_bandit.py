"""The bandit over arms: allocation on a synthetic reward table, and across tiny-model rounds."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from conftest import last_json

from looper.errors import LooperError
from looper.regime_w.bandit import allocate, arm_reward_stats

ARMS = ["a", "b", "c", "d"]


def synthetic_rows(pay: dict[str, float], questions: int = 50, seed: int = 0) -> list[dict]:
    """Rollouts rows where arm x is right (reward 1, else -0.5) with probability pay[x]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(questions):
        rewards = [1.0 if rng.random() < pay[arm] else -0.5 for arm in ARMS]
        rows.append({"arm_outputs": [{"arm": arm} for arm in ARMS], "arm_rewards": rewards})
    return rows


@pytest.mark.parametrize("strategy", ["thompson", "ucb"])
def test_budget_shifts_to_the_arm_that_pays_and_keeps_the_floor(strategy):
    stats = arm_reward_stats(synthetic_rows({"a": 0.2, "b": 0.8, "c": 0.3, "d": 0.25}))
    assert stats["b"]["n"] == 50 and stats["b"]["mean"] > stats["a"]["mean"]
    alloc = allocate(strategy, ARMS, budget=8, floor=0.05, stats=stats, seed=0)
    assert sum(alloc.shares.values()) == pytest.approx(1.0)
    assert max(alloc.shares, key=alloc.shares.get) == "b" and alloc.shares["b"] > 0.5
    assert all(alloc.shares[arm] >= 0.05 - 1e-12 for arm in ARMS)  # the floor
    assert set(alloc.posterior) == set(ARMS)
    # whole samples per question: the budget exactly; over many questions the shares
    counts = Counter(arm for q in range(400) for arm in alloc.arms_for(f"q{q}", seed=0))
    assert all(len(alloc.arms_for(f"q{q}", 0)) == 8 for q in range(20))
    for arm in ARMS:
        assert counts[arm] / 3200 == pytest.approx(alloc.shares[arm], abs=0.02)
    assert alloc.arms_for("q1", 0) == alloc.arms_for("q1", 0)  # seeded per question: shards and resume agree


def test_no_data_is_uniform():
    for strategy in ("uniform", "thompson", "ucb"):
        alloc = allocate(strategy, ARMS, budget=8, floor=0.05, stats=None)
        assert alloc.shares == dict.fromkeys(ARMS, 0.25)
        assert alloc.arms_for("q", 0) == ["a", "a", "b", "b", "c", "c", "d", "d"]


def test_allocation_errors():
    with pytest.raises(LooperError, match="--arm-floor 0.3"):
        allocate("thompson", ARMS, 8, 0.3, None)
    with pytest.raises(LooperError, match="--arm-allocation greedy"):
        allocate("greedy", ARMS, 8, 0.0, None)


def test_thompson_across_rounds_on_the_tiny_model(run_cli, tmp_path, tiny_model_dir):
    from pathlib import Path

    from looper.config import PrepareConfig
    from looper.stages import prepare
    from looper.store.artifacts import Store, read_rows

    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=20, synthetic_test=4, workdir=str(tmp_path))
    )
    common = ["--model", tiny_model_dir, "--workdir", tmp_path, "--policy", "base", "--arms", "4"]
    common += [
        "--max-new-tokens",
        "6",
        "--batch-size",
        "16",
        "--limit",
        "4",
        "--arm-allocation",
        "thompson",
        "--json",
    ]
    code, out, err = run_cli("rollouts", *common)
    assert code == 0, err
    first = last_json(out)
    stats = first["metrics"]["arm_reward_stats"]
    assert set(stats) == {"wolfram-t0.2", "maudlin-t0.2", "wolfram-t0.3", "maudlin-t0.3"}
    code, out, err = run_cli("rollouts", *common, "--arm-prior", first["version"], "--offset", "4")
    assert code == 0, err
    second = last_json(out)
    manifest = Store(tmp_path).resolve("rollouts", second["version"]).manifest
    alloc = manifest["allocation"]
    assert (
        alloc["prior"] == first["version"] and manifest["inputs"]["arm_prior"]["version"] == first["version"]
    )
    assert sum(alloc["samples_per_question"].values()) == pytest.approx(4)
    assert all(p["n"] == 4 and "p_best" in p for p in alloc["posterior"].values())
    rows = [r for f in sorted(Path(second["path"]).glob("shard-*.parquet")) for r in read_rows(f)]
    assert all(len(r["arm_outputs"]) == 4 for r in rows)


@pytest.mark.slow
def test_thompson_across_loop_rounds(run_cli, tmp_path):
    import json
    from pathlib import Path

    from test_loop import TINY

    pipeline = tmp_path / "p.toml"
    pipeline.write_text(TINY.replace("[rollouts]\n", '[rollouts]\narm_allocation = "thompson"\n'))
    code, out, err = run_cli(
        "--config", pipeline, "loop", "--workdir", tmp_path / "home", "--rounds", "2", "--patience", "2",
        "--no-test-eval", "--json",
    )  # fmt: skip
    assert code == 0, err
    path = Path(last_json(out)["path"])
    rounds = json.loads((path / "manifest.json").read_text())["rounds"]
    # the loop records home-relative paths (a moved home keeps working)
    second = json.loads((tmp_path / "home" / rounds[1]["rollouts"]["path"] / "manifest.json").read_text())
    assert second["allocation"]["prior"] == rounds[0]["rollouts"]["version"]
    assert second["allocation"]["strategy"] == "thompson" and second["allocation"]["posterior"]
    assert "## Arm allocation" in (path / "report.md").read_text()
