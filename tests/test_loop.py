"""`looper loop`: rounds with lineage, resume after interruptions, early stop, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from looper.config import LoopConfig, build_config, read_pipeline_file
from looper.errors import LooperError
from looper.loop import run as loop_stage
from looper.loop.report import write_report
from looper.loop.rounds import (
    anchored,
    final_round,
    patience_exhausted,
    read_record,
    rounds_without_improvement,
)
from tests.conftest import last_json

# The smallest pipeline that still runs every stage of a round on the random tiny model.
TINY = """
[common]
model = "looper:tiny"
seed = 0

[prepare]
source = "synthetic"
synthetic_train = 30
synthetic_test = 6

[sft]
max_steps = 2
batch_size = 4
grad_accum = 1
learning_rate = 1e-3
gradient_checkpointing = false
dev_limit = 2
eval_steps = 100
save_steps = 100

[rollouts]
limit = 2
arms = 2
cf_arms = "wolfram-t0.2"
max_new_tokens = 4
shard_size = 2
backend = "hf"

[ppo]
questions_per_step = 2
questions_per_minibatch = 1
gradient_checkpointing = false
learning_rate = 1e-3
save_steps = 100

[eval]
limit = 2
max_new_tokens = 4
backend = "hf"
bootstrap = 50
"""


@pytest.fixture
def pipeline(tmp_path) -> Path:
    path = tmp_path / "tiny-loop.toml"
    path.write_text(TINY)
    return path


def manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def loop_config(pipeline: Path, home: Path, **values) -> LoopConfig:
    return build_config(
        LoopConfig,
        file_values=read_pipeline_file(pipeline)["loop"],
        cli_values={"workdir": str(home), "pipeline": str(pipeline), **values},
    )


# --------------------------------------------------------------------------- pure parts


def test_rounds_without_improvement_counts_trailing_rounds_not_beating_the_best():
    assert rounds_without_improvement(0.2, []) == 0
    assert rounds_without_improvement(0.2, [0.3]) == 0
    assert rounds_without_improvement(0.2, [0.2]) == 1  # equal is no improvement
    assert rounds_without_improvement(0.2, [0.3, 0.25, 0.3]) == 2  # best stays 0.3
    assert rounds_without_improvement(0.2, [0.1, 0.25]) == 0


def test_final_round_best_is_the_earliest_highest_and_last_is_last():
    rounds = [
        {"round": k, "figures": {"dev": {"accuracy": a}}} for k, a in ((1, 0.3), (2, 0.4), (3, 0.4), (4, 0.1))
    ]
    assert final_round(rounds, "best")["round"] == 2
    assert final_round(rounds, "last")["round"] == 4


def test_patience_counts_from_sft_and_an_unreadable_record_names_the_fix(tmp_path):
    def rounds(*accuracies):
        return [{"figures": {"dev": {"accuracy": a}, "sft_dev": {"accuracy": 0.2}}} for a in accuracies]

    assert not patience_exhausted([], 1)
    assert patience_exhausted(rounds(0.2), 1)  # sft's 0.2 is round 0: equal is no improvement
    assert not patience_exhausted(rounds(0.3, 0.25), 2)
    assert patience_exhausted(rounds(0.3, 0.25, 0.3), 2)
    record = tmp_path / "rounds.json"
    record.write_text('{"rounds": [')  # cut off mid-write by hand
    with pytest.raises(LooperError, match="rounds.json: unreadable .*--force"):
        read_record(record)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rounds": 0}, "--rounds: 0 is out of range"),
        ({"patience": 0}, "--patience: 0 is out of range"),
        ({"algorithm": "sac"}, "--algorithm: 'sac' is not one of"),
        ({"final": "mean"}, "--final: 'mean' is not one of"),
        ({"dev_limit": 0}, "--dev-limit: 0 is out of range"),
        ({"mode": "rlhf"}, "--mode: 'rlhf' is not one of"),
    ],
)
def test_bad_options_are_one_line_errors(pipeline, tmp_path, values, message):
    with pytest.raises(LooperError, match=message):  # checked centrally by build_config
        loop_stage.run(loop_config(pipeline, tmp_path / "home", **values))


def test_loop_needs_a_pipeline_file(tmp_path):
    config = build_config(LoopConfig, file_values={}, cli_values={"workdir": str(tmp_path)})
    with pytest.raises(LooperError, match="needs a pipeline file"):
        loop_stage.run(config)


def test_loop_table_is_read_and_checked(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[loop]\nrounds = 4\npatience = 1\n")
    assert read_pipeline_file(path)["loop"] == {"rounds": 4, "patience": 1}
    path.write_text("[loop]\nrownds = 4\n")
    with pytest.raises(LooperError, match="unknown key 'rownds' in \\[loop\\]"):
        read_pipeline_file(path)


# --------------------------------------------------------------------------- on the tiny model


class Interrupt(KeyboardInterrupt):
    pass


ORIGINAL_STEPS = loop_stage.ROUND_STEPS


def interrupting(step_name: str, at_round: int):
    """The round's steps with `step_name` raising (like Ctrl-C) when it starts round `at_round`."""

    def wrap(name, step):
        def run(loop, rnd):
            if name == step_name and rnd["round"] == at_round:
                raise Interrupt
            return step(loop, rnd)

        return name, run

    return tuple(wrap(n, s) for n, s in ORIGINAL_STEPS)


@pytest.mark.slow
def test_two_rounds_lineage_resume_between_and_inside_rounds(pipeline, tmp_path, monkeypatch):
    home = tmp_path / "home"
    calls: list[tuple[str, str]] = []
    real_run_stage = loop_stage.LoopContext.run_stage

    def counting(self, stage, label, **overrides):
        calls.append((label, stage))
        return real_run_stage(self, stage, label, **overrides)

    monkeypatch.setattr(loop_stage.LoopContext, "run_stage", counting)
    config = loop_config(pipeline, home, rounds=2, patience=5)

    # 1. interrupted between rounds: round 1 finished, round 2 not begun
    monkeypatch.setattr(loop_stage, "ROUND_STEPS", interrupting("rollouts", 2))
    with pytest.raises(Interrupt):
        loop_stage.run(config)
    assert calls == [
        ("setup", "prepare"),
        ("setup", "sft"),
        ("round 1", "rollouts"),
        ("round 1", "ppo"),
        ("round 1", "eval"),
    ]
    partial = next((home / "checkpoints" / "loop").glob("*.partial"))
    record = json.loads((partial / "rounds.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [1]

    # 2. interrupted inside round 2: its rollouts done, its ppo not; round 1 is not run again
    calls.clear()
    monkeypatch.setattr(loop_stage, "ROUND_STEPS", interrupting("train", 2))
    with pytest.raises(Interrupt):
        loop_stage.run(config)
    assert calls == [("round 2", "rollouts")]
    record = json.loads((partial / "rounds.json").read_text())
    assert (
        record["current"]["round"] == 2
        and "rollouts" in record["current"]
        and "train" not in record["current"]
    )

    # 3. resumed to the end: round 2's rollouts are found finished (skipped), then ppo and eval
    calls.clear()
    monkeypatch.setattr(loop_stage, "ROUND_STEPS", ORIGINAL_STEPS)
    result = loop_stage.run(config)
    assert calls == [("round 2", "rollouts"), ("round 2", "ppo"), ("round 2", "eval"), ("final", "eval")]
    assert not result.skipped and result.counts["rounds"] == 2

    out = Path(result.path)
    m = manifest(out)
    r1, r2 = anchored(m["rounds"], home)  # the manifest's paths are home-relative (issue 22)
    assert not Path(m["rounds"][0]["train"]["path"]).is_absolute()
    assert r2["policy_in"] == f"ppo:{r1['train']['version']}"  # a policy by version, never a path
    # lineage: round 1 rolls out sft, round 2 rolls out round 1's ppo adapter
    sft_version = m["inputs"]["sft"]["version"]
    assert manifest(r1["rollouts"]["path"])["inputs"]["sft"]["version"] == sft_version
    assert manifest(r2["rollouts"]["path"])["inputs"]["ppo"]["version"] == r1["train"]["version"]
    adapter_path = manifest(r2["rollouts"]["path"])["policy"]["adapter_path"]  # home-relative
    assert Path(result.path).parents[2] / adapter_path == Path(r1["train"]["path"])
    assert manifest(r2["train"]["path"])["inputs"]["rollouts"]["version"] == r2["rollouts"]["version"]
    assert manifest(r2["eval"]["path"])["questions"]["split"] == "dev"
    # each round rolls out the next train questions
    assert (r1["rollouts"]["offset"], r2["rollouts"]["offset"]) == (0, 2)
    # the final policy is an adapter artifact of its own, with the report
    for name in ("adapter_model.safetensors", "adapter_config.json", "report.md", "loop.png", "rounds.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| 1 |" in report and "| 2 |" in report and "McNemar" in report
    assert m["base_model"]["identity"]

    # a rerun does nothing
    calls.clear()
    again = loop_stage.run(config)
    assert again.skipped and again.version == result.version
    assert calls == []


@pytest.mark.slow
def test_early_stop_when_dev_accuracy_does_not_improve(pipeline, tmp_path, run_cli):
    """The random tiny model scores 0% on dev: round 1 does not beat sft's 0%, so patience 1 stops there."""
    home = tmp_path / "home"
    code, out, err = run_cli(
        "--config",
        pipeline,
        "loop",
        "--rounds",
        "3",
        "--patience",
        "1",
        "--no-test-eval",
        "--workdir",
        home,
        "--json",
    )
    assert code == 0, err
    result = last_json(out)
    assert result["counts"]["rounds"] == 1
    m = manifest(result["path"])
    assert m["stop"] == "patience"
    assert "stopping early" in out
    # the final policy is usable by name
    code, out, err = run_cli(
        "--config", pipeline, "eval", "--compare", "loop", "--split", "dev", "--workdir", home
    )
    assert code == 0, err


def test_report_from_a_hand_written_summary(tmp_path):
    def figures(acc, reward, kl):
        return {
            "dev": {"accuracy": acc, "ci95": [acc - 0.05, acc + 0.05], "correct": int(100 * acc), "n": 100},
            "sft_dev": {"accuracy": 0.2, "ci95": [0.13, 0.29], "correct": 20, "n": 100},
            "vs_sft": {"diff": acc - 0.2, "mcnemar_p": 0.04},
            "arms": 8,
            "mean_reward": reward,
            "mean_question_reward": reward,
            "pass_at_n": 0.6,
            "maj_at_n": 0.3,
            "auroc_s_wm": 0.7,
            "zero_variance_groups": 5,
            "questions": 32,
            "kl_mean": kl,
            "kl_last": kl,
            "steps": 8,
        }

    rounds = [
        {
            "round": k,
            "rollouts": {"version": f"r{k}"},
            "train": {"stage": "ppo", "version": f"p{k}"},
            "wall_s": 600.0,
            "figures": figures(acc, reward, kl),
        }
        for k, acc, reward, kl in ((1, 0.25, 0.1, 0.01), (2, 0.3, 0.2, None))
    ]
    test = {
        "split": "prepare v test split",
        "version": "e1",
        "diff": 0.08,
        "ci95": [0.03, 0.13],
        "mcnemar_p": 0.0123,
        "only_sft_right": 4,
        "only_final_right": 28,
        "sft": {"accuracy": 0.2, "ci95": [0.16, 0.25], "correct": 60, "n": 300},
        "final": {"accuracy": 0.28, "ci95": [0.23, 0.33], "correct": 84, "n": 300},
    }
    summary = {
        "rounds": rounds,
        "final": {"round": 2, "stage": "ppo", "version": "p2"},
        "stop": "rounds",
        "test": test,
    }
    write_report(tmp_path, summary, "sft")
    report = (tmp_path / "report.md").read_text()
    assert "| 1 | r1 | p1 | 25.0% | [20.0%, 30.0%] |" in report
    assert "| 2 | r2 | p2 | 30.0% |" in report and "| - |" in report  # no KL logged: a dash, not a crash
    assert "McNemar exact p = 0.0123" in report and "| final | 28.0% | [23.0%, 33.0%] | 84/300 |" in report
    assert (tmp_path / "loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_expert_loop_starts_from_the_gold_sft(tmp_path):
    """sft --rollouts versions published by the rounds move sft's LATEST; the loop keeps the gold one."""
    from looper.loop.run import gold_sft
    from looper.store.artifacts import Store

    store = Store(tmp_path)

    def publish(stage, version, inputs, filename):
        run = store.begin(stage, version)
        (run.path / filename).write_bytes(b"{}")
        return run.commit(config={}, inputs=inputs, identity={})

    prepare = publish("prepare", "p1", {}, "train.parquet")
    rollouts = publish("rollouts", "r1", {"prepare": prepare}, "shard-00000.parquet")
    publish("sft", "gold1", {"prepare": prepare}, "adapter_config.json")
    publish("sft", "round1", {"rollouts": rollouts}, "adapter_config.json")
    assert store.resolve("sft").version == "round1"  # LATEST moved to the round's adapter
    assert gold_sft(store).version == "gold1"
