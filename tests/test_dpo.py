"""`looper dpo`: preference pairs from hand-written rows; the command on hand-built rollouts (tiny model, CPU)."""

from __future__ import annotations

import json

from conftest import last_json
from test_ppo import build_rollouts, mean_logprob

from looper.rewards.summary import ROW_SCHEMA
from looper.stages.dpo import preference_pairs
from looper.store.artifacts import Store, write_parquet

FAST = ["--batch-size", "2", "--grad-accum", "1", "--no-gradient-checkpointing", "--save-steps", "100"]


def question(qid: str, arms: list[tuple[bool, float]]) -> dict:
    """A rollouts row reduced to what pairing reads; arm i answers `a{i}` under prompt `p{i % 2}`."""
    return {
        "id": qid,
        "arm_rewards": [r for _, r in arms],
        "arm_outputs": [
            {"arm": f"a{i}", "prompt": f"p{i % 2}", "text": f"{qid}-a{i}", "correct": ok}
            for i, (ok, _) in enumerate(arms)
        ],
    }


def write_rollouts(workdir, model_dir, rows, version: str, adapter_path=None) -> None:
    from looper.policy.models import resolve_model

    run = Store(workdir).begin("rollouts", version)
    write_parquet(run.path / "shard-00000.parquet", rows, ROW_SCHEMA)
    run.commit(
        config={},
        inputs={},
        identity={},
        extra={
            "base_model": {"spec": str(model_dir), "identity": resolve_model(str(model_dir)).identity},
            "policy": {"name": "sft" if adapter_path else "base", "adapter_path": adapter_path},
        },
    )


def test_pairs_best_correct_against_worst_incorrect():
    rows = [
        question(
            "mixed", [(True, 0.9), (False, -0.2), (True, 1.3), (False, -0.7), (True, 1.1), (False, -0.5)]
        ),
        question("none-right", [(False, -0.5), (False, -0.4)]),
        question("all-right", [(True, 1.0), (True, 1.2)]),
        question("one-wrong", [(True, 1.0), (True, 1.2), (False, -0.5)]),
    ]
    one = preference_pairs(rows, 1)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in one] == [
        ("mixed", "mixed-a2", "mixed-a3"),
        ("one-wrong", "one-wrong-a1", "one-wrong-a2"),
    ]
    assert one[0]["prompt"] == "p0" and one[0]["cross_prompt"]  # the chosen arm's prompt, for both
    assert (one[0]["chosen_reward"], one[0]["rejected_reward"]) == (1.3, -0.7)
    two = preference_pairs(rows, 2)  # paired in order; limited by the smaller side (one-wrong: 1 wrong arm)
    assert [(p["chosen_arm"], p["rejected_arm"]) for p in two] == [("a2", "a3"), ("a4", "a5"), ("a1", "a2")]
    assert len(preference_pairs(rows, 5)) == 3 + 1
    assert preference_pairs(rows[1:3], 3) == []


def test_dpo_trains_chosen_over_rejected(run_cli, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = build_rollouts(tmp_path, tiny_model_dir)  # 2 questions x 4 arms, arms 0/2 right, 1/3 wrong
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gap_before = mean_logprob(base, tokenizer, rows, True) - mean_logprob(base, tokenizer, rows, False)

    args = [
        "dpo",
        "--model",
        tiny_model_dir,
        "--workdir",
        tmp_path,
        *FAST,
        "--pairs-per-question",
        "2",
        "--max-steps",
        "4",
        "--learning-rate",
        "2e-2",
        "--lora-r",
        "16",
        "--beta",
        "0.5",
        "--json",
    ]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "dpo: 4 preference pair(s) from 2 questions; 0 question(s) give none" in out
    result = last_json(out)
    assert result["counts"] == {"questions": 2, "pairs": 4, "questions_without_pairs": 0, "steps": 4}
    assert result["metrics"]["final_reward_accuracy"] == 1.0 and result["metrics"]["final_reward_margin"] > 0
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result["path"])
    gap_after = mean_logprob(trained, tokenizer, rows, True) - mean_logprob(trained, tokenizer, rows, False)
    assert gap_after > gap_before + 0.5, (gap_before, gap_after)

    manifest = json.loads(open(f"{result['path']}/manifest.json").read())
    assert manifest["inputs"]["rollouts"]["version"] == "hand0" and manifest["reference"] == "base"
    assert manifest["base_model"]["spec"] == str(tiny_model_dir)
    metrics = [json.loads(line) for line in open(f"{result['path']}/metrics.jsonl")]
    assert sum("rewards/accuracies" in m for m in metrics) == 4
    assert not (tmp_path / "checkpoints" / "dpo" / result["version"] / "trainer").exists()

    code, out, err = run_cli(*args)
    assert code == 0 and last_json(out)["skipped"] and last_json(out)["version"] == result["version"]


def sft_rollouts(workdir, model_dir) -> list[dict]:
    """build_rollouts' rows, as if rolled out by an sft adapter (random, so it moves the policy off the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = build_rollouts(workdir / "hand", model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    before = mean_logprob(base, tokenizer, rows, True)
    sft = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert abs(mean_logprob(sft, tokenizer, rows, True) - before) > 0.05  # the adapter changes the policy
    sft.save_pretrained(workdir / "sft-adapter")
    write_rollouts(workdir, model_dir, rows, "fromsft", adapter_path=str(workdir / "sft-adapter"))
    return rows


def test_reference_is_the_rollouts_adapter(run_cli, tiny_model_dir, tmp_path):
    """Rollouts of an sft adapter: DPO's reference is that adapter, so before any update the policy
    equals the reference and the implicit rewards are 0 (with the base as reference they are not)."""
    sft_rollouts(tmp_path, tiny_model_dir)
    code, out, err = run_cli(
        "dpo",
        "--model",
        tiny_model_dir,
        "--workdir",
        tmp_path,
        *FAST,
        "--max-steps",
        "1",
        "--beta",
        "1.0",
        "--json",
    )
    assert code == 0, err
    result = last_json(out)
    first = json.loads(open(f"{result['path']}/metrics.jsonl").readline())
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5, first
    manifest = json.loads(open(f"{result['path']}/manifest.json").read())
    assert manifest["reference"] == "sft-adapter"  # recorded relative to the home it lies in
    assert not (
        tmp_path / "checkpoints" / "dpo" / result["version"] / "ref"
    ).exists()  # TRL's frozen copy: not saved


def test_interrupted_run_resumes(run_cli, tiny_model_dir, tmp_path, monkeypatch):
    from looper.train import runner

    sft_rollouts(tmp_path, tiny_model_dir)
    metrics_callback = runner.metrics_callback

    def interrupting(path):  # the metrics file as usual, and a crash right after the step-2 checkpoint
        class Interrupt(type(metrics_callback(path))):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == 2:
                    raise RuntimeError("power cut")

        return Interrupt()

    args = [
        "dpo",
        "--model",
        tiny_model_dir,
        "--workdir",
        tmp_path,
        "--batch-size",
        "1",
        "--grad-accum",
        "1",
        "--no-gradient-checkpointing",
        "--save-steps",
        "1",
        "--max-steps",
        "4",
        "--json",
    ]
    monkeypatch.setattr(runner, "metrics_callback", interrupting)
    code, _, err = run_cli(*args)
    assert code == 1 and "power cut" in err
    monkeypatch.setattr(runner, "metrics_callback", metrics_callback)
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "dpo: resuming from checkpoint-2" in out and last_json(out)["counts"]["steps"] == 4
    metrics = [json.loads(line) for line in open(f"{last_json(out)['path']}/metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]


def test_dpo_errors(run_cli, tiny_model_dir, tmp_path):
    rows = build_rollouts(tmp_path / "hand", tiny_model_dir)
    for row in rows:
        row["arm_outputs"] = [{**o, "correct": True} for o in row["arm_outputs"]]
    write_rollouts(tmp_path, tiny_model_dir, rows, "allright")
    code, _, err = run_cli("dpo", "--model", tiny_model_dir, "--workdir", tmp_path)
    assert (
        code == 1
        and "rollouts allright give no preference pairs: every question's arms are all correct" in err
    )
    assert not list((tmp_path / "checkpoints").glob("dpo/*.partial"))

    write_rollouts(tmp_path, tiny_model_dir, [], "empty")
    code, _, err = run_cli("dpo", "--model", tiny_model_dir, "--workdir", tmp_path)
    assert code == 1 and "rollouts empty hold no questions" in err

    from looper.policy.tiny import tiny_model

    other = tiny_model(tmp_path / "other-model", seed=1)
    code, _, err = run_cli("dpo", "--model", other, "--workdir", tmp_path)
    assert code == 1 and "were generated from base" in err
    code, _, err = run_cli(
        "dpo", "--model", tiny_model_dir, "--workdir", tmp_path, "--pairs-per-question", "0"
    )
    assert code == 1 and "--pairs-per-question: 0 is out of range" in err
