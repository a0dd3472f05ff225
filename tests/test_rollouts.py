"""`looper rollouts` on the tiny model (hf backend), arms, perturbations, resume and merge."""

from __future__ import annotations

import math

import pytest
from conftest import last_json

from looper.errors import LooperError
from looper.regime_w import reward, scoring
from looper.regime_w.arms import DEFAULT_ARMS, load_arm_file, select_arms
from looper.regime_w.perturb import perturb
from looper.store.artifacts import Store, read_rows

FAST = ["--policy", "base", "--arms", "2", "--max-new-tokens", "6", "--batch-size", "8"]


@pytest.fixture
def workdir(tmp_path):
    from looper.config import PrepareConfig
    from looper.stages import prepare

    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=30, synthetic_test=6, workdir=str(tmp_path))
    )
    return tmp_path


def rollout(run_cli, workdir, model, *extra):
    code, out, err = run_cli("rollouts", "--model", model, "--workdir", workdir, *FAST, *extra, "--json")
    assert code == 0, err
    return last_json(out)


def rows_of(path):
    from pathlib import Path

    return sorted(
        (r for f in sorted(Path(path).glob("shard-*.parquet")) for r in read_rows(f)), key=lambda r: r["id"]
    )


def test_default_arms_order_and_selection():
    assert [a.name for a in DEFAULT_ARMS][:4] == [
        "wolfram-t0.2",
        "maudlin-t0.2",
        "wolfram-t0.3",
        "maudlin-t0.3",
    ]
    assert len(DEFAULT_ARMS) == 8 and {a.temperature for a in DEFAULT_ARMS} == {0.2, 0.3, 0.4, 0.5}
    assert [a.name for a in select_arms(3)] == ["wolfram-t0.2", "maudlin-t0.2", "wolfram-t0.3"]
    with pytest.raises(LooperError, match="--arms 9"):
        select_arms(9)


def test_arm_file(tmp_path):
    good = tmp_path / "arms.toml"
    good.write_text(
        '[[arm]]\nname = "a"\nstyle = "wolfram"\ntemperature = 0.7\n'
        '[[arm]]\nname = "b"\nstyle = "Only equations."\ntemperature = 1\ntop_p = 0.9\n'
    )
    arms = load_arm_file(good)
    assert arms[0].instruction.startswith("You are a precise") and arms[1].instruction == "Only equations."
    bad = tmp_path / "bad.toml"
    bad.write_text('[[arm]]\nname = "a"\nstyle = "wolfram"\n')
    with pytest.raises(LooperError, match=r"arm #1: missing \['temperature'\]"):
        load_arm_file(bad)


def test_perturbations_keep_facts_and_question():
    q = "Ann has 3 apples. She buys 4 more. How many apples does she have?"
    moved = perturb(q, "question_first", key="x")
    assert moved == "How many apples does she have? Ann has 3 apples. She buys 4 more."
    noisy = perturb(q, "irrelevant", key="x")
    assert noisy.startswith("Ann has 3 apples. She buys 4 more. ") and noisy.endswith(
        "How many apples does she have?"
    )
    assert noisy == perturb(q, "irrelevant", key="x") and len(noisy) > len(q)


def test_rollouts_end_to_end(run_cli, workdir, tiny_model_dir):
    result = rollout(run_cli, workdir, tiny_model_dir, "--limit", "5", "--shard-size", "2")
    assert result["counts"] == {"questions": 5, "shards": 3, "arms": 2}
    rows = rows_of(result["path"])
    assert len(rows) == 5 and len({r["id"] for r in rows}) == 5
    for row in rows:
        outputs = row["arm_outputs"]
        assert [o["arm"] for o in outputs] == ["wolfram-t0.2", "maudlin-t0.2"]
        for o in outputs:
            assert len(o["logprobs"]) == len(o["token_ids"]) and o["tokens"] <= 6
            # token_ids keep the EOS that ended a completion; `tokens` does not count it
            assert len(o["token_ids"]) - o["tokens"] == (o["finish_reason"] == "stop")
            assert all(lp <= 0 for lp in o["logprobs"]) and o["prompt"].endswith("assistant\n")
        assert [c["perturbation"] for c in row["cf_outputs"]] == ["irrelevant", "question_first"]
        # stored scores and rewards are what the pure functions give on the stored outputs
        answers, tokens = [o["answer"] for o in outputs], [o["tokens"] for o in outputs]
        expected = scoring.score_question(answers, tokens, answers, [c["answer"] for c in row["cf_outputs"]])
        for key, value in expected.items():
            assert math.isclose(row[key], value)
        assert row["arm_rewards"] == pytest.approx(
            reward.arm_rewards([o["correct"] for o in outputs], tokens, answers, row["s_wm"])
        )
    manifest = Store(workdir).resolve("rollouts").manifest
    assert set(manifest["metrics"]["arm_accuracy"]) == {"wolfram-t0.2", "maudlin-t0.2"}
    assert manifest["sampling"]["max_new_tokens"] == 6 and manifest["policy"]["name"] == "base"
    assert manifest["generated_by"] == {"backend": "hf", "quant": "none", "dtype": "float32", "adapter": None}
    assert rollout(run_cli, workdir, tiny_model_dir, "--limit", "5", "--shard-size", "2")["skipped"]


def test_no_s_cf_re_asks_when_no_stored_reward_weighs_s_cf(run_cli, workdir, tiny_model_dir):
    """coherence and counterfactual at 0: the re-asks are not generated, the manifest says so, and
    rescore (like ppo) refuses weights that would read the missing s_cf."""
    result = rollout(
        run_cli, workdir, tiny_model_dir, "--limit", "2", "--weights", "coherence=0,counterfactual=0"
    )
    assert all(row["cf_outputs"] == [] and row["s_cf"] == 0 for row in rows_of(result["path"]))
    sampling = Store(workdir).resolve("rollouts").manifest["sampling"]
    assert sampling["cf_arms"] == [] and sampling["cf_skipped"] == ["wolfram-t0.2", "maudlin-t0.2"]
    code, _, err = run_cli("rollouts", "rescore", "--workdir", workdir, "--weights", "coherence=0.7")
    assert code == 1 and "skipped their s_cf re-asks" in err, err


def test_resume_after_crash_matches_uninterrupted(run_cli, workdir, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from looper.stages import rollouts

    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    straight = rows_of(rollout(run_cli, other, tiny_model_dir, "--limit", "6", "--shard-size", "2")["path"])

    real_chunk, calls = rollouts.rollout_chunk, {"n": 0}

    def dies_on_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(rollouts, "rollout_chunk", dies_on_second_chunk)
    code, _, _ = run_cli(
        "rollouts",
        "--model",
        tiny_model_dir,
        "--workdir",
        workdir,
        *FAST,
        "--limit",
        "6",
        "--shard-size",
        "2",
    )
    assert code == 130
    partial = next((workdir / "data" / "rollouts").glob("*.partial"))
    assert [p.name for p in partial.glob("shard-*.parquet")] == ["shard-00000.parquet"]
    monkeypatch.setattr(rollouts, "rollout_chunk", real_chunk)
    resumed = rows_of(rollout(run_cli, workdir, tiny_model_dir, "--limit", "6", "--shard-size", "2")["path"])
    assert [r["id"] for r in resumed] == [r["id"] for r in straight]
    assert [[o["text"] for o in r["arm_outputs"]] for r in resumed] == [
        [o["text"] for o in r["arm_outputs"]] for r in straight
    ]


def test_shards_merge_into_the_unsharded_version(run_cli, workdir, tiny_model_dir):
    whole = rollout(run_cli, workdir, tiny_model_dir, "--limit", "5", "--shard-size", "2")
    one = rollout(run_cli, workdir, tiny_model_dir, "--limit", "5", "--shard-size", "2", "--shard", "1/2")
    two = rollout(run_cli, workdir, tiny_model_dir, "--limit", "5", "--shard-size", "2", "--shard", "2/2")
    assert one["counts"]["questions"] == 3 and two["counts"]["questions"] == 2
    code, out, err = run_cli(
        "rollouts", "merge", one["version"], two["version"], "--workdir", workdir, "--json", "--force"
    )
    assert code == 0, err
    merged = last_json(out)
    assert merged["version"] == whole["version"] and merged["counts"]["questions"] == 5
    assert [r["id"] for r in rows_of(merged["path"])] == [r["id"] for r in rows_of(whole["path"])]
    code, _, err = run_cli("rollouts", "merge", one["version"], "--workdir", workdir)
    assert code == 1 and "exactly the shards" in err


def test_rollouts_errors(run_cli, workdir, tiny_model_dir, tmp_path):
    code, _, err = run_cli("rollouts", "--model", tiny_model_dir, "--workdir", workdir)
    assert code == 1 and "run `looper sft` first" in err and "--policy base" in err
    code, _, err = run_cli(
        "rollouts", "--model", tiny_model_dir, "--workdir", workdir, *FAST, "--split", "test"
    )
    assert code == 1 and "never read the test split" in err
    code, _, err = run_cli(
        "rollouts", "--model", tiny_model_dir, "--workdir", workdir, *FAST, "--cf-arms", "nope"
    )
    assert code == 1 and "nope not among the arms" in err
    bad = tmp_path / "arms.toml"
    bad.write_text("[[arm]]\nname = 3\n")
    code, _, err = run_cli(
        "rollouts", "--model", tiny_model_dir, "--workdir", workdir, *FAST, "--arm-file", bad
    )
    assert code == 1 and "arm file" in err
    code, _, err = run_cli(
        "rollouts", "--model", tiny_model_dir, "--workdir", workdir, *FAST, "--shard", "3/2"
    )
    assert code == 1 and "--shard 3/2" in err


def test_regime_w_demo(run_cli):
    code, out, _ = run_cli("regime-w", "demo")
    assert code == 0 and "split 2-2" in out and "0.333" in out
