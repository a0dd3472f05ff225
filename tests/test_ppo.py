"""`looper ppo` on a hand-built rollouts artifact and the tiny model (TRL GRPOTrainer, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import last_json

from looper.errors import LooperError
from looper.rewards.summary import ROW_SCHEMA
from looper.store.artifacts import Store, write_parquet
from looper.train.grpo import replay_func
from looper.train.grpo_math import AdaptiveKL, StepPlan, floored_advantages, kl_horizon, total_steps

GOOD, BAD = " 3 + 4 = 7\n#### 7", " 3 + 4 = 9\n#### 9"
FAST = [
    "--questions-per-step",
    "2",
    "--questions-per-minibatch",
    "1",
    "--no-gradient-checkpointing",
    "--save-steps",
    "100",
]


def completion_logprobs(
    model, tokenizer, prompt: str, completion_ids: list[int], temperature: float = 1.0
) -> list[float]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return (
        torch.log_softmax(logits.float() / temperature, -1)
        .gather(1, torch.tensor(completion_ids)[:, None])[:, 0]
        .tolist()
    )


def make_adapter(model_dir, path, *, dropout: float) -> str:
    """An sft-like LoRA adapter with non-zero weights (so its dropout changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    return str(path)


def build_rollouts(
    workdir,
    model_dir,
    *,
    logprob_shift: float = 0.0,
    adapter: str | None = None,
    questions: int = 2,
    edit=None,
    generated_by: dict | None = None,
):
    """Two questions x 4 arms: arms 0 and 2 answer right (reward 1), arms 1 and 3 wrong (-0.5).

    Log-probs are the policy's (the base, or `adapter` on it, in eval mode) at the arms' temperature
    0.3 (rollouts schema 4: tempered), plus `logprob_shift`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from looper.data.prompts import render_prompt, tutoring_messages
    from looper.policy.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    rows = []
    for q in range(questions):
        question = f"Tom has 3 apples and gets 4 more (case {q}). How many apples?"
        prompt = render_prompt(tokenizer, tutoring_messages(question))
        outputs = []
        for arm in range(4):
            text = GOOD if arm % 2 == 0 else BAD
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]  # EOS stored
            logprobs = [
                lp + logprob_shift
                for lp in completion_logprobs(model, tokenizer, prompt, ids, temperature=0.3)
            ]
            outputs.append(
                {
                    "arm": f"a{arm}",
                    "style": "wolfram",
                    "temperature": 0.3,
                    "prompt": prompt,
                    "text": text,
                    "reasoning": text,
                    "answer": "7" if arm % 2 == 0 else "9",
                    "correct": arm % 2 == 0,
                    "tokens": len(ids) - 1,
                    "finish_reason": "stop",
                    "token_ids": ids,
                    "logprobs": logprobs,
                }
            )
        rows.append(
            {
                "id": f"q{q}",
                "question": question,
                "gold_answer": "7",
                "policy": "base",
                "arm_outputs": outputs,
                "cf_outputs": [],
                "s_end": 1 / 3,
                "s_path": 1.0,
                "s_cf": 1.0,
                "s_wm": 0.7,
                "reward": 1.49,
                "arm_rewards": [1.0, -0.5, 1.0, -0.5],
            }
        )
    if edit is not None:
        edit(rows, tokenizer)
    store = Store(workdir)
    run = store.begin("rollouts", f"hand{int(logprob_shift)}")
    write_parquet(run.path / "shard-00000.parquet", rows, ROW_SCHEMA)
    base = resolve_model(str(model_dir))
    run.commit(
        config={},
        inputs={},
        identity={},
        extra={
            "base_model": {"spec": str(model_dir), "identity": base.identity},
            "policy": {"name": "base" if adapter is None else "sft", "adapter_path": adapter},
            "generated_by": generated_by
            or {"backend": "hf", "quant": "none", "dtype": "float32", "adapter": "merged"},
        },
    )
    return rows


def mean_logprob(model, tokenizer, rows, correct: bool) -> float:
    values = [
        sum(completion_logprobs(model, tokenizer, o["prompt"], o["token_ids"]))
        for r in rows
        for o in r["arm_outputs"]
        if o["correct"] == correct
    ]
    return sum(values) / len(values)


def test_training_raises_rewarded_completions(run_cli, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = build_rollouts(tmp_path, tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gap_before = mean_logprob(base, tokenizer, rows, True) - mean_logprob(base, tokenizer, rows, False)

    code, out, err = run_cli(
        "ppo",
        "--model",
        tiny_model_dir,
        "--workdir",
        tmp_path,
        *FAST,
        "--max-steps",
        "8",
        "--learning-rate",
        "2e-2",
        "--lora-r",
        "16",
        "--json",
    )
    assert code == 0, err
    result = last_json(out)
    assert result["counts"] == {
        "questions": 2,
        "arms": 4,
        "zero_variance_groups": 0,
        "skipped_empty": 0,
        "trained_questions": 2,
        "steps": 8,
    }
    assert "2 questions x 4 arms; 0 question group(s) have zero reward variance" in out
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result["path"])
    gap_after = mean_logprob(trained, tokenizer, rows, True) - mean_logprob(trained, tokenizer, rows, False)
    assert gap_after > gap_before + 0.5, (gap_before, gap_after)

    manifest = json.loads(open(f"{result['path']}/manifest.json").read())
    assert manifest["inputs"]["rollouts"]["version"] == "hand0" and manifest["loss_type"] == "dapo"
    metrics = [json.loads(line) for line in open(f"{result['path']}/metrics.jsonl")]
    steps = [m for m in metrics if "kl_coef" in m]
    assert len(steps) == 8 and all("kl" in m and "clip_ratio/region_mean" in m for m in steps)
    assert all(m["completions/clipped_ratio"] == 0 for m in steps)  # every stored completion ends on its EOS


@pytest.mark.slow
def test_first_token_eos_trains_and_an_empty_completion_is_skipped(run_cli, tiny_model_dir, tmp_path):
    def edit(rows, tokenizer):
        eos_only = rows[1]["arm_outputs"][1]  # the first sampled token was EOS: one stored token, 0 counted
        eos_only.update(
            token_ids=eos_only["token_ids"][-1:], logprobs=eos_only["logprobs"][-1:], text="", tokens=0
        )
        empty = rows[2]["arm_outputs"][
            3
        ]  # what an older backend stored for it: nothing (TRL raised IndexError)
        empty.update(token_ids=[], logprobs=[], text="", tokens=0)

    build_rollouts(tmp_path, tiny_model_dir, questions=3, edit=edit)
    code, out, err = run_cli(
        "ppo", "--model", tiny_model_dir, "--workdir", tmp_path, *FAST, "--max-steps", "2", "--json"
    )
    assert code == 0, err
    assert "1 question(s) skipped: an arm with no stored token" in out
    counts = last_json(out)["counts"]
    assert counts["questions"] == 2 and counts["skipped_empty"] == 1 and counts["steps"] == 2


def test_ppo_refuses_rollouts_without_stored_eos(run_cli, tiny_model_dir, tmp_path):
    build_rollouts(tmp_path, tiny_model_dir)
    manifest_path = next((tmp_path / "data" / "rollouts").glob("hand*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(manifest | {"schema_version": 1}))
    code, _, err = run_cli("ppo", "--model", tiny_model_dir, "--workdir", tmp_path)
    assert code == 1 and "rerun `looper rollouts`" in err and "schema 1" in err, err


def test_ratio_is_taken_against_stored_logprobs(run_cli, tiny_model_dir, tmp_path):
    """Stored log-probs 1 nat below the policy's: ratio e^1 > 1 + eps on every token.

    The clipped objective then clips every token whose advantage is positive (half the arms here);
    with the true log-probs the ratio is 1 and nothing is clipped."""
    results = {}
    for shift in (0.0, -1.0):
        workdir = tmp_path / f"shift{shift}"
        build_rollouts(workdir, tiny_model_dir, logprob_shift=shift)
        code, out, err = run_cli(
            "ppo",
            "--model",
            tiny_model_dir,
            "--workdir",
            workdir,
            *FAST,
            "--max-steps",
            "1",
            "--learning-rate",
            "1e-9",
            "--json",
        )
        assert code == 0, err
        metrics = [json.loads(line) for line in open(f"{last_json(out)['path']}/metrics.jsonl")]
        results[shift] = next(m for m in metrics if "clip_ratio/region_mean" in m)["clip_ratio/region_mean"]
    assert results[0.0] < 0.05 and results[-1.0] == pytest.approx(0.5, abs=0.02), results


@pytest.mark.slow
def test_dropout_is_off_in_ratio_and_kl(run_cli, tiny_model_dir, tmp_path):
    """Continuing an adapter with LoRA dropout at lr ~0: policy = reference = behaviour, so kl 0, nothing clipped."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "sft-adapter", dropout=0.3)
    build_rollouts(tmp_path, tiny_model_dir, adapter=adapter)
    code, out, err = run_cli(
        "ppo",
        "--model",
        tiny_model_dir,
        "--workdir",
        tmp_path,
        *FAST,
        "--max-steps",
        "1",
        "--learning-rate",
        "1e-12",
        "--json",
    )
    assert code == 0, err
    metrics = [json.loads(line) for line in open(f"{last_json(out)['path']}/metrics.jsonl")]
    step = next(m for m in metrics if "kl" in m)
    assert step["kl"] == pytest.approx(0.0, abs=1e-6) and step["clip_ratio/region_mean"] == 0.0, step


@pytest.mark.slow
def test_recomputed_behaviour_logprobs_equal_stored_ones_for_the_same_weights(
    run_cli, tiny_model_dir, tmp_path
):
    build_rollouts(tmp_path, tiny_model_dir)
    code, out, err = run_cli(
        "ppo",
        "--model",
        tiny_model_dir,
        "--workdir",
        tmp_path,
        *FAST,
        "--max-steps",
        "1",
        "--behaviour-logprobs",
        "recompute",
        "--json",
    )
    assert code == 0, err
    manifest = json.loads(open(f"{last_json(out)['path']}/manifest.json").read())
    assert (
        manifest["behaviour_logprobs"] == "recompute" and manifest["metrics"]["behaviour_logprob_gap"] < 1e-5
    )
    assert "mean |stored - recomputed| = " in out


@pytest.mark.slow
def test_auto_recomputes_behaviour_logprobs_of_other_weights(run_cli, tiny_model_dir, tmp_path):
    """Rollouts sampled by vLLM in bf16 (stand-in: log-probs 1 nat off): auto recomputes, logs the gap, and the
    ratio starts at 1 (nothing clipped at lr ~0), where the stored ones would clip half the tokens."""
    build_rollouts(
        tmp_path,
        tiny_model_dir,
        logprob_shift=-1.0,
        generated_by={"backend": "vllm", "quant": "none", "dtype": "auto", "adapter": None},
    )
    code, out, err = run_cli(
        "ppo",
        "--model",
        tiny_model_dir,
        "--workdir",
        tmp_path,
        *FAST,
        "--max-steps",
        "1",
        "--learning-rate",
        "1e-9",
        "--json",
    )
    assert code == 0, err
    assert (
        "behaviour log-probs recompute (rollouts sampled with other weights than trained: backend vllm vs hf"
        in out
    )
    result = last_json(out)
    manifest = json.loads(open(f"{result['path']}/manifest.json").read())
    assert manifest["metrics"]["behaviour_logprob_gap"] == pytest.approx(1.0, abs=1e-4)
    metrics = [json.loads(line) for line in open(f"{result['path']}/metrics.jsonl")]
    assert next(m for m in metrics if "clip_ratio/region_mean" in m)["clip_ratio/region_mean"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "reference, kl_coef",
    [("adapter", "0.04"), ("base", "0.04"), ("base", "0")],
    ids=["ref-copy-pass", "fresh-lora-pass", "eager-pass"],
)
def test_recompute_trains_as_if_the_stored_logprobs_were_exact(
    run_cli, tiny_model_dir, tmp_path, reference, kl_coef
):
    """Stored log-probs 1 nat off, recomputed, train the adapter that exact stored ones train: with a KL
    reference the recompute is the reference pass (TRL's frozen copy of a continued adapter, or the
    base under a fresh LoRA); with --kl-coef 0 there is none and ppo scores every row before training."""
    from safetensors.torch import load_file

    adapter = make_adapter(tiny_model_dir, tmp_path / "sft", dropout=0.0) if reference == "adapter" else None
    trained = {}
    for shift, source in ((0.0, "stored"), (-1.0, "recompute")):
        workdir = tmp_path / source
        build_rollouts(workdir, tiny_model_dir, logprob_shift=shift, adapter=adapter, questions=4)
        code, out, err = run_cli(
            "ppo", "--model", tiny_model_dir, "--workdir", workdir, *FAST,
            "--max-steps", "2", "--learning-rate", "1e-3", "--kl-coef", kl_coef,
            "--behaviour-logprobs", source, "--json",
        )  # fmt: skip
        assert code == 0, err
        path = last_json(out)["path"]
        manifest = json.loads(open(f"{path}/manifest.json").read())
        assert manifest["behaviour_logprobs"] == source
        trained[source] = load_file(f"{path}/adapter_model.safetensors")
        if source == "recompute":
            # the eager pass says so before training; the reference pass after, over the rows trained
            assert ("over the trained completions" in out) == (kl_coef != "0"), out
            assert manifest["metrics"]["behaviour_logprob_gap"] == pytest.approx(1.0, abs=1e-4)
    assert trained["stored"].keys() == trained["recompute"].keys()
    for name, weights in trained["stored"].items():
        torch.testing.assert_close(trained["recompute"][name], weights, atol=1e-5, rtol=1e-4)
    assert any("lora_B" in n and w.abs().max() > 0 for n, w in trained["stored"].items())  # it trained


def test_behaviour_logprobs_source():
    from looper.train.grpo_math import behaviour_logprobs_source

    hf_cpu = {"backend": "hf", "quant": "none", "dtype": "float32"}
    assert behaviour_logprobs_source("auto", hf_cpu | {"adapter": "merged"}, hf_cpu)[0] == "stored"
    source, why = behaviour_logprobs_source(
        "auto",
        {"backend": "vllm", "quant": "none", "dtype": "auto"},
        {"backend": "hf", "quant": "4bit", "dtype": "bfloat16"},
    )
    assert source == "recompute" and "quant none vs 4bit" in why and "backend vllm vs hf" in why
    assert behaviour_logprobs_source("auto", None, hf_cpu)[0] == "recompute"
    assert behaviour_logprobs_source("stored", None, hf_cpu)[0] == "stored"
    with pytest.raises(LooperError, match="--behaviour-logprobs both"):
        behaviour_logprobs_source("both", None, hf_cpu)


@pytest.mark.parametrize("start_coef", [0.004, 0.4])
def test_adaptive_kl_reaches_its_target_within_tens_of_steps(start_coef):
    """A synthetic policy whose per-token KL is 0.004 / coef (and lags one step): target 0.1 needs coef 0.04."""
    controller = AdaptiveKL(start_coef, target=0.1, horizon=kl_horizon(0, total_steps(60, 1.0, None)))
    kl, history = 0.0, []  # the first step's KL is 0: the policy starts at the reference
    for _ in range(40):
        coef = controller.update(kl)
        kl = 0.5 * kl + 0.5 * 0.004 / coef  # KL follows the coefficient with a lag
        history.append(kl)
    assert all(abs(k / 0.1 - 1) < 0.1 for k in history[30:]), history  # within 10% of target from step 30 on
    assert controller.coef == pytest.approx(0.04, rel=0.1) and controller.steps == 40


def test_adaptive_kl_controller_step_rule():
    up = AdaptiveKL(0.04, target=0.1, horizon=5)
    assert up.update(kl=10.0) == pytest.approx(0.04 * math.exp(1 / 5))  # log-error clipped at +1
    assert AdaptiveKL(0.04, target=0.1, horizon=5).update(kl=0.05) == pytest.approx(0.04 * 0.5 ** (1 / 5))
    assert AdaptiveKL(0.04, target=0.1, horizon=5).update(kl=0.0) == pytest.approx(0.04 * math.exp(-1 / 5))
    assert AdaptiveKL(0.04, target=0.0, horizon=5).update(kl=5.0) == 0.04  # target 0: fixed
    restored = AdaptiveKL(0.04, target=0.1, horizon=5)
    restored.load_state_dict(up.state_dict())
    assert restored.coef == up.coef and restored.steps == 1
    assert (
        kl_horizon(0, 8) == 2
        and kl_horizon(0, 50) == 5
        and kl_horizon(0, 1000) == 10
        and kl_horizon(7, 50) == 7
    )


def test_reward_modes_build_the_advantages_they_claim(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from looper.rewards.trainer_adapter import reward_plan, row_components

    rows = build_rollouts(tmp_path, tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [r["id"] for r in rows for _ in range(4)]  # TRL repeats each prompt num_generations times
    plan = reward_plan(None, None, "arm", {})
    arm = replay_func(rows, tokenizer, 4, row_components(rows, plan, {}, "arm"))(prompts, None)
    assert arm["reward_correctness"] == [1.0, -0.5, 1.0, -0.5] * 2
    assert arm["completion_ids"][0] == rows[0]["arm_outputs"][0]["token_ids"]
    assert arm["logprobs"][1] == rows[0]["arm_outputs"][1]["logprobs"]
    question = replay_func(rows, tokenizer, 4, row_components(rows, plan, {}, "question"))(prompts, None)
    assert question["reward_correctness"] == [1.0] * 8 and question["reward_coherence"] == [0.7] * 8
    # question mode: centred over the batch, not the group
    advantages = floored_advantages(torch.tensor([1.0, 1.0, 3.0, 3.0]), None, 0.1)
    assert advantages.tolist() == pytest.approx([-0.866, -0.866, 0.866, 0.866], abs=1e-3)
    assert floored_advantages(torch.tensor([2.0]), None, 0.1).tolist() == [0.0]


def test_group_std_floor_keeps_tiny_reward_differences_tiny():
    from looper.regime_w.reward import arm_rewards

    # eight correct, agreeing arms of 401-408 tokens: rewards differ by the length penalty alone (< 0.01)
    agreeing = arm_rewards([True] * 8, list(range(401, 409)), ["7"] * 8, s_wm=0.9)
    right_wrong = arm_rewards([True, False] * 4, [200] * 8, ["7", "9"] * 4, s_wm=0.5)
    advantages = floored_advantages(torch.tensor(agreeing + right_wrong), 8, 0.1)
    assert advantages[:8].abs().max() < 0.05, advantages[:8]  # TRL's std + 1e-4 gives +-1.4 here
    assert advantages[8:].abs().min() > 0.9  # a real difference keeps its full size


def test_ppo_errors(run_cli, tiny_model_dir, tmp_path):
    code, _, err = run_cli("ppo", "--model", tiny_model_dir, "--workdir", tmp_path)
    assert code == 1 and "run `looper rollouts` first" in err
    build_rollouts(tmp_path, tiny_model_dir)
    other = tmp_path / "other-model"
    from looper.policy.tiny import tiny_model

    tiny_model(other, seed=1)
    code, _, err = run_cli("ppo", "--model", other, "--workdir", tmp_path)
    assert code == 1 and "were generated from base" in err
    code, _, err = run_cli("ppo", "--model", tiny_model_dir, "--workdir", tmp_path, "--reward", "both")
    assert code == 1 and "--reward: 'both' is not one of" in err
    # 2 questions: a step of 3 cannot be made, nor one of 2 questions from mini-batches of 3 (no 0-step adapter)
    for online in ([], ["--online"]):
        code, _, err = run_cli(
            "ppo",
            "--model",
            tiny_model_dir,
            "--workdir",
            tmp_path,
            *online,
            "--questions-per-step",
            "3",
            "--questions-per-minibatch",
            "1",
        )
        assert code == 1 and "fewer than --questions-per-step 3" in err, err
        code, _, err = run_cli(
            "ppo",
            "--model",
            tiny_model_dir,
            "--workdir",
            tmp_path,
            *online,
            "--questions-per-step",
            "2",
            "--questions-per-minibatch",
            "3",
        )
        assert code == 1 and "not a whole number of --questions-per-minibatch 3" in err, err
    assert not list((tmp_path / "checkpoints").glob("ppo/*")), "an error must leave no artifact"


def test_skip_flat_groups_keeps_only_groups_with_reward_variance(run_cli, tiny_model_dir, tmp_path):
    from looper.train.grpo_math import skip_flat

    rows = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    assert skip_flat(rows, {"b"}, "correctness") == [{"id": "a"}, {"id": "c"}]
    with pytest.raises(LooperError, match="all 3 question groups have zero reward variance"):
        skip_flat(rows, {"a", "b", "c"}, "arm")
    with pytest.raises(LooperError, match="--skip-flat-groups needs per-arm rewards"):
        skip_flat(rows, set(), "question")
    build_rollouts(tmp_path, tiny_model_dir)
    code, _, err = run_cli(
        "ppo", "--model", tiny_model_dir, "--workdir", tmp_path, "--skip-flat-groups", "--reward", "question"
    )
    assert code == 1 and "--skip-flat-groups needs per-arm rewards" in err, err
    assert not list((tmp_path / "checkpoints").glob("ppo/*")), "an error must leave no artifact"


def test_step_plan_reports_the_left_out_questions():
    from looper.train.grpo_math import step_plan

    assert step_plan(10, 4, 2) == StepPlan(micro_batches=2, steps_per_epoch=2, left_out=2)
    assert step_plan(8, 8, 8) == StepPlan(micro_batches=1, steps_per_epoch=1, left_out=0)


def test_online_grpo_generates_and_trains(run_cli, tiny_model_dir, tmp_path):
    build_rollouts(tmp_path, tiny_model_dir)
    code, out, err = run_cli(
        "ppo",
        "--model",
        tiny_model_dir,
        "--workdir",
        tmp_path,
        "--online",
        *FAST,
        "--online-generations",
        "3",
        "--max-new-tokens",
        "6",
        "--max-steps",
        "2",
        "--json",
    )
    assert code == 0, err
    result = last_json(out)
    assert result["counts"] == {"questions": 2, "group_size": 3, "steps": 2}
    metrics = [json.loads(line) for line in open(f"{result['path']}/metrics.jsonl")]
    assert any(m.get("completions/max_length", 0) <= 6 and "kl_coef" in m for m in metrics)


def online_total(texts, gold, completion_ids, table=None, scoring=None, eos_ids=()):
    from looper.rewards import registry
    from looper.rewards.trainer_adapter import online_reward_funcs, reward_plan

    plan = reward_plan(table, None, "arm", scoring or {})
    group = [f"g{i // 2}" for i in range(len(texts))]
    parts = {
        fn.__name__: fn(texts, gold_answer=gold, completion_ids=completion_ids, group=group)
        for fn in online_reward_funcs(plan, eos_ids)
    }
    return registry.combine(parts, plan.spec.weights)


def test_online_group_reward_on_hand_written_group():
    rewards = online_total(
        ["#### 7", "#### 9", "#### 5", "#### 5"],
        ["7", "7", "5", "5"],
        [[1] * 10] * 3 + [[1] * 9 + [0]],
        eos_ids={0},
    )  # the last ends on EOS: 9 tokens, s_path < 1
    # group 1: one right, answers disagree (s_end 0): right arm 1 + 0.7*(0.5*0 + 0.5*0.3); wrong -0.5 + same
    assert rewards[:2] == pytest.approx([1.105, -0.395])
    # group 2: both right and agreeing (s_end 1), lengths 10 and 9 (EOS not counted)
    from looper.regime_w import scoring

    s_wm = 0.4 + 0.3 * scoring.s_path([10, 9])
    assert s_wm < 0.7 and rewards[2:] == pytest.approx([1 + 0.7 * (0.5 + 0.5 * s_wm)] * 2)


def test_online_reward_uses_the_rollouts_weights_and_the_blend():
    # blend 1: coherence is the arm's own agreement alone; disagreeing arms get none of s_wm
    scoring = {"w_end": 0.9, "w_path": 0.1, "w_cf": 0.0}
    assert online_total(
        ["#### 7", "#### 9"], ["7", "7"], [[1] * 10] * 2, table={"coherence_blend": 1.0}, scoring=scoring
    ) == [1.0, -0.5]


@pytest.mark.slow
def test_resume_matches_uninterrupted(run_cli, tiny_model_dir, tmp_path, monkeypatch):
    """Killed in step 4 (step 3 logged, last checkpoint at 2): the resumed run ends where an uninterrupted one
    does (adapter, KL controller, the recomputed behaviour log-probs' gap), and metrics.jsonl holds each
    step once."""
    from safetensors.torch import load_file

    from looper.train.grpo import ReplayGRPOTrainer

    # no LoRA dropout: TRL rebuilds its shuffling sampler on resume, so micro-batch order (and with it
    # the dropout masks drawn) can differ; the accumulated gradient of a step does not
    args = [
        *FAST,
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--learning-rate",
        "1e-2",
        "--lora-dropout",
        "0",
        "--kl-target",
        "100",
        "--behaviour-logprobs",
        "recompute",
        "--json",
    ]  # KL far below target: every step shrinks the coefficient
    straight, broken = tmp_path / "a", tmp_path / "b"
    build_rollouts(straight, tiny_model_dir, logprob_shift=-1.0)
    build_rollouts(broken, tiny_model_dir, logprob_shift=-1.0)
    code, out, err = run_cli("ppo", "--model", tiny_model_dir, "--workdir", straight, *args)
    assert code == 0, err
    reference = last_json(out)
    reference_weights = load_file(f"{reference['path']}/adapter_model.safetensors")

    original, calls = ReplayGRPOTrainer.training_step, {"n": 0}

    def dies_in_step_four(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # 2 micro-batches per step: the 7th is step 4, after step 3 was logged
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(ReplayGRPOTrainer, "training_step", dies_in_step_four)
    code, _, _ = run_cli("ppo", "--model", tiny_model_dir, "--workdir", broken, *args)
    assert code == 130
    partial = next((broken / "checkpoints" / "ppo").glob("*.partial"))
    saved = json.loads((partial / "trainer" / "checkpoint-2" / "kl_controller.json").read_text())
    logged = [json.loads(line) for line in open(f"{reference['path']}/metrics.jsonl")]
    assert saved["steps"] == 2 and saved["coef"] == next(m["kl_coef"] for m in logged if m["step"] == 2)
    gap_sum, gap_tokens = json.loads(
        (partial / "trainer" / "checkpoint-2" / "behaviour_gap.json").read_text()
    )
    assert gap_tokens > 0 and gap_sum / gap_tokens == pytest.approx(1.0, abs=1e-4)  # steps 1-2's rows
    monkeypatch.setattr(ReplayGRPOTrainer, "training_step", original)
    code, out, err = run_cli("ppo", "--model", tiny_model_dir, "--workdir", broken, *args)
    assert code == 0, err
    assert "resuming from checkpoint-2" in out
    resumed = last_json(out)
    resumed_weights = load_file(f"{resumed['path']}/adapter_model.safetensors")
    for name in reference_weights:
        torch.testing.assert_close(resumed_weights[name], reference_weights[name], rtol=1e-4, atol=1e-6)
    final = [
        json.loads(open(f"{r['path']}/manifest.json").read())["metrics"]["final_kl_coef"]
        for r in (reference, resumed)
    ]
    assert final[0] != 0.04 and final[1] == pytest.approx(final[0], rel=1e-6), final
    gaps = [json.loads(open(f"{r['path']}/manifest.json").read())["metrics"] for r in (reference, resumed)]
    assert gaps[1]["behaviour_logprob_gap"] == pytest.approx(gaps[0]["behaviour_logprob_gap"], abs=1e-6)
    lines = [json.loads(line) for line in open(f"{resumed['path']}/metrics.jsonl")]
    steps = [m["step"] for m in lines if "loss" in m]  # a training step's line (not the end-of-run summary)
    assert steps == [1, 2, 3, 4], steps


@pytest.mark.slow
def test_online_resume_restores_the_kl_controller(run_cli, tiny_model_dir, tmp_path, monkeypatch):
    from looper.train.grpo import AdaptiveKLGRPOTrainer

    args = [
        "--online",
        *FAST,
        "--online-generations",
        "2",
        "--max-new-tokens",
        "4",
        "--max-steps",
        "3",
        "--save-steps",
        "1",
        "--kl-target",
        "100",
        "--json",
    ]  # every step shrinks the coefficient: a restart shows
    straight, broken = tmp_path / "a", tmp_path / "b"
    build_rollouts(straight, tiny_model_dir)
    build_rollouts(broken, tiny_model_dir)
    code, out, err = run_cli("ppo", "--model", tiny_model_dir, "--workdir", straight, *args)
    assert code == 0, err
    reference = json.loads(open(f"{last_json(out)['path']}/manifest.json").read())["metrics"]["final_kl_coef"]

    original, calls = AdaptiveKLGRPOTrainer.training_step, {"n": 0}

    def dies_in_step_three(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 micro-batches per step
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(AdaptiveKLGRPOTrainer, "training_step", dies_in_step_three)
    code, _, _ = run_cli("ppo", "--model", tiny_model_dir, "--workdir", broken, *args)
    assert code == 130
    partial = next((broken / "checkpoints" / "ppo").glob("*.partial"))
    assert json.loads((partial / "trainer" / "checkpoint-2" / "kl_controller.json").read_text())["steps"] == 2
    monkeypatch.setattr(AdaptiveKLGRPOTrainer, "training_step", original)
    code, out, err = run_cli("ppo", "--model", tiny_model_dir, "--workdir", broken, *args)
    assert code == 0 and "resuming from checkpoint-2" in out, err
    resumed = json.loads(open(f"{last_json(out)['path']}/manifest.json").read())["metrics"]["final_kl_coef"]
    assert resumed == pytest.approx(reference, rel=1e-6) and resumed != 0.04


def test_ppo_logs_each_component_with_scheduled_weights(run_cli, tiny_model_dir, tmp_path):
    build_rollouts(tmp_path, tiny_model_dir)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[rewards]\ncoherence = 0.0\nformat = 0.5\npost = "clip,normalize"\nclip_min = -1.0\nclip_max = 1.0\n'
        "[rewards.schedule]\ncorrectness = [{at = 0.0, weight = 0.0}, {at = 1.0, weight = 1.0}]\n"
    )
    args = ["--model", tiny_model_dir, "--workdir", tmp_path, *FAST, "--max-steps", "4", "--json"]
    code, out, err = run_cli("--config", pipeline, "ppo", *args, "--weights", "length=0")
    assert code == 0, err
    result = last_json(out)
    steps = [json.loads(line) for line in open(f"{result['path']}/metrics.jsonl") if '"kl_coef"' in line]
    assert len(steps) == 4 and all(
        {"rewards/correctness/mean", "rewards/format/mean"} <= set(m) for m in steps
    )
    assert not any("rewards/coherence/mean" in m or "rewards/length/mean" in m for m in steps)
    assert [m["weights/correctness"] for m in steps] == [0.0, 0.25, 0.5, 0.75]  # linear over the 4 steps
    assert all(m["weights/format"] == 0.5 for m in steps)
    assert open(f"{result['path']}/reward_weights.png", "rb").read(4) == b"\x89PNG"
    manifest = json.loads(open(f"{result['path']}/manifest.json").read())
    assert manifest["rewards"]["post"] == "clip,normalize" and manifest["rewards"]["schedule"]["correctness"]
    # other weights, another version; the same ones, up to date
    code, out, _ = run_cli("--config", pipeline, "ppo", *args, "--weights", "length=0")
    assert code == 0 and last_json(out)["skipped"]
    code, out, _ = run_cli("--config", pipeline, "ppo", *args, "--weights", "length=1", "--max-steps", "1")
    assert code == 0 and last_json(out)["version"] != result["version"]
