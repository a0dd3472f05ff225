"""Hybrid rounds: the SFT curriculum, rejection-sampling SFT on rollouts, a 2-round hybrid loop with exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import last_json

from looper.loop.hybrid import sft_rounds
from looper.stages.sft_rollouts import best_correct_arms


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
    assert [(p["id"], p["arm"], p["completion"]) for p in best_correct_arms(rows)] == [
        ("q1", "b", "t-b"),
        ("q3", "a", "t-a"),
    ]


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
        assert (home / r["export"] / "config.json").is_file()  # merged, standalone (home-relative)
    assert rounds[1]["policy_in"] == f"{rounds[0]['train']['stage']}:{rounds[0]['train']['version']}"
    code, out, _ = run_cli(*args)
    assert code == 0 and last_json(out)["skipped"]
