"""Hybrid rounds: the SFT curriculum, rejection-sampling SFT on rollouts, a 2-round hybrid loop with exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import last_json

from looper.loop.hybrid import sft_rounds
from looper.stages.sft_rollouts import correct_completions


def test_sft_rounds_curriculum():
    assert sft_rounds(16, 2, 2) == [1, 3, 7, 15]  # SFT-heavy early, RL-heavy later
    assert sft_rounds(7, 3, 1) == [1, 4, 7]  # growth 1: a fixed period
    assert sft_rounds(5, 1, 1) == [1, 2, 3, 4, 5]
    assert sft_rounds(1, 2, 2) == [1]


def test_best_correct_arm_of_each_question():
    def arm(name, correct):
        return {"arm": name, "correct": correct, "prompt": f"p-{name}", "text": f"t-{name}"}

    rows = [
        {"id": "q1", "arm_outputs": [arm("a", True), arm("b", True), arm("c", False)], "arm_rewards": [1.2, 1.5, 9]},
        {"id": "q2", "arm_outputs": [arm("a", False), arm("b", False)], "arm_rewards": [0.1, 0.2]},
        {"id": "q3", "arm_outputs": [arm("a", True), arm("b", True)], "arm_rewards": [1.0, 1.0]},  # tie: first
    ]  # fmt: skip
    assert [(p["id"], p["arm"], p["completion"]) for p in correct_completions(rows)] == [
        ("q1", "b", "t-b"),
        ("q3", "a", "t-a"),
    ]


def test_up_to_k_distinct_correct_completions_per_question():
    def arm(name, correct, text):
        return {"arm": name, "correct": correct, "prompt": f"p-{name}", "text": text}

    rows = [
        {
            "id": "q1",
            "arm_outputs": [arm("a", True, "x"), arm("b", True, "x"), arm("c", True, "y"), arm("d", True, "z")],
            "arm_rewards": [1.0, 1.5, 1.2, 0.9],
        },
        {"id": "q2", "arm_outputs": [arm("a", False, "w"), arm("b", True, "v")], "arm_rewards": [0.0, 1.0]},
    ]  # fmt: skip
    got = [(p["id"], p["arm"], p["completion"]) for p in correct_completions(rows, per_question=2)]
    # q1: b (1.5, text x), then c (1.2, y); a repeats x, d is the third; q2: its one correct arm
    assert got == [("q1", "b", "x"), ("q1", "c", "y"), ("q2", "b", "v")]
    assert len(correct_completions(rows, per_question=8)) == 4  # x, y, z and v: duplicates dropped


def test_sft_on_rollouts_trains_the_best_correct_arms(run_cli, tiny_model_dir, tmp_path):
    from test_ppo import build_rollouts

    build_rollouts(tmp_path, tiny_model_dir)  # 2 questions x 4 arms, arms 0 and 2 right
    args = ["sft", "--model", tiny_model_dir, "--workdir", tmp_path, "--rollouts", "latest"]
    args += [
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--no-gradient-checkpointing",
        "--json",
    ]
    code, out, err = run_cli(*args)
    assert code == 0, err
    result = last_json(out)
    assert result["counts"]["train_questions"] == 2 and result["counts"]["steps"] == 2
    assert (Path(result["path"]) / "adapter_model.safetensors").is_file()
    manifest = json.loads((Path(result["path"]) / "manifest.json").read_text())
    assert manifest["inputs"]["rollouts"]["version"] == "hand0" and manifest["mode"] == "rejection-sampling"
    code, out, _ = run_cli(*args)
    assert code == 0 and last_json(out)["skipped"]


@pytest.mark.slow
def test_hybrid_loop_two_rounds_on_tiny_test_with_exports(run_cli, tmp_path):
    pipeline = Path(__file__).resolve().parents[1] / "pipelines" / "tiny-test.toml"
    home = tmp_path / "home"
    args = ["--config", pipeline, "loop", "--workdir", home, "--mode", "hybrid", "--rounds", "2"]
    args += ["--sft-every", "1", "--sft-growth", "1", "--export-every", "1", "--no-test-eval", "--json"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    result = last_json(out)
    manifest = json.loads((Path(result["path"]) / "manifest.json").read_text())
    rounds = manifest["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:  # SFT rounds both; the random tiny model's rollouts may hold no correct arm: then ppo
        assert r["train"]["stage"] in ("sft", "ppo")
        assert (Path(r["export"]) / "config.json").is_file()  # merged, standalone
    assert rounds[1]["policy_in"] == rounds[0]["train"]["path"]
    code, out, _ = run_cli(*args)
    assert code == 0 and last_json(out)["skipped"]


def test_expert_sft_trains_epochs_over_the_kept_completions(run_cli, tiny_model_dir, tmp_path):
    """--per-question and --epochs (no --max-steps): 2 questions x 1 distinct correct text = 2 pairs,
    batch 2 -> 1 step per epoch, 3 epochs -> 3 steps; the totals of the run are reported."""
    from test_ppo import build_rollouts

    build_rollouts(tmp_path, tiny_model_dir)  # arms 0 and 2 right with the same text
    code, out, err = run_cli(
        "sft", "--model", tiny_model_dir, "--workdir", tmp_path, "--rollouts", "latest",
        "--per-question", "4", "--epochs", "3", "--batch-size", "2", "--grad-accum", "1",
        "--no-gradient-checkpointing", "--dev-limit", "0", "--json",
    )  # fmt: skip
    assert code == 0, err
    counts = last_json(out)["counts"]
    assert (counts["train_questions"], counts["train_completions"], counts["steps"]) == (2, 2, 3)
    assert counts["train_tokens"] > 0


def test_expert_round_runs_sft_on_its_rollouts_by_epochs(tmp_path):
    """The expert step hands sft the round's rollouts, --per-question, --expert-epochs and no max_steps."""
    from looper.config import LoopConfig
    from looper.loop.hybrid import round_steps
    from looper.store.artifacts import Store

    store = Store(tmp_path)
    run = store.begin("rollouts", "r1")
    (run.path / "shard-00000.parquet").write_bytes(b"")
    rollouts = run.commit(config={}, inputs={}, identity={}, metrics={"pass_at_n": 0.5})
    calls = []

    class Loop:
        config = LoopConfig(mode="expert", per_question=3, expert_epochs=1.5, pipeline="p.toml")

        def run_stage(self, stage, label, unset=(), **overrides):
            calls.append((stage, unset, overrides))
            return type("Result", (), {"version": "s1", "path": "/sft/s1"})()

    train = dict(round_steps(Loop.config, (("train", lambda loop, rnd: calls.append("ppo")),)))["train"]
    rnd = {"round": 1, "rollouts": {"version": "r1", "path": str(rollouts.path)}}
    train(Loop(), rnd)
    assert calls == [("sft", ("max_steps",), {"rollouts": "r1", "per_question": 3, "epochs": 1.5})]
    assert rnd["train"] == {"stage": "sft", "version": "s1", "path": "/sft/s1"}
