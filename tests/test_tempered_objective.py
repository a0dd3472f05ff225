"""The policy trained is the policy that sampled: every completion is trained at its arm's temperature.

Hand-computed: the tempered log-prob's gradient on a 2-token toy. Through the real stages on the
tiny model: rollouts sampled at T = 0.3 store log-probs that the training forward reproduces (the
step-0 importance ratio is 1), and the first step's KL to the reference is 0; the online trainer
scores at the temperature it currently samples with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import last_json

from looper.errors import LooperError
from looper.train.grpo_math import TEMPERED_SCHEMA, behaviour_logprobs_source, tempered_logprobs


def test_tempered_logprob_gradient_on_a_two_token_toy():
    """log softmax(z / T)[y] with z = (1, 0), y = 0, T = 0.5: value and gradient by hand."""
    z = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    logp = tempered_logprobs(z, torch.tensor([[0]]), torch.tensor([0.5]))
    p0 = math.exp(2.0) / (math.exp(2.0) + 1.0)  # softmax of z / T = (2, 0)
    assert logp.item() == pytest.approx(math.log(p0), abs=1e-6)
    logp.sum().backward()
    # d/dz log softmax(z / T)[0] = (onehot(0) - softmax(z / T)) / T
    assert z.grad[0, 0].tolist() == pytest.approx([(1 - p0) / 0.5, (0 - (1 - p0)) / 0.5], abs=1e-6)


def test_rows_keep_their_own_temperature():
    """Two rows, the same logits, temperatures 1 and 0.25: each is its own distribution."""
    z = torch.tensor([[[2.0, 1.0, 0.0]], [[2.0, 1.0, 0.0]]])
    got = tempered_logprobs(z, torch.tensor([[1], [1]]), torch.tensor([1.0, 0.25]))
    for row, t in enumerate((1.0, 0.25)):
        want = torch.log_softmax(z[row, 0] / t, -1)[1]
        assert got[row, 0].item() == pytest.approx(want.item(), abs=1e-6)


def test_untempered_rollouts_are_recomputed_never_mixed():
    training = {"backend": "hf", "quant": "none", "dtype": "float32"}
    same = dict(training)
    assert behaviour_logprobs_source("auto", same, training, TEMPERED_SCHEMA)[0] == "stored"
    source, why = behaviour_logprobs_source("auto", same, training, 3)
    assert source == "recompute" and "untempered" in why
    with pytest.raises(LooperError, match="untempered"):
        behaviour_logprobs_source("stored", same, training, 3)


ARMS = """
[[arm]]
name = "cold-a"
style = "Solve the problem step by step. End with '#### <answer>'."
temperature = 0.3

[[arm]]
name = "cold-b"
style = "Solve it. End with '#### <answer>'."
temperature = 0.3
"""


@pytest.mark.slow
def test_step_zero_ratio_is_one_and_kl_is_zero_at_temperature_0_3(run_cli, tiny_model_dir, tmp_path):
    arm_file = tmp_path / "arms.toml"
    arm_file.write_text(ARMS)
    home = ["--workdir", tmp_path, "--json"]
    code, _, err = run_cli(
        "prepare", "--source", "synthetic", "--synthetic-train", "8", "--synthetic-test", "2", *home
    )
    assert code == 0, err
    # float32: the weights ppo trains ('auto' samples in bf16 on a CPU with AVX-512 BF16/AMX)
    code, out, err = run_cli(
        "rollouts", "--model", tiny_model_dir, "--arm-file", arm_file, "--arms", "2", "--cf-arms", "",
        "--policy", "base", "--limit", "4", "--max-new-tokens", "12", "--dtype", "float32", *home,
    )  # fmt: skip
    assert code == 0, err
    rollouts = last_json(out)
    manifest = json.loads((Path(rollouts["path"]) / "manifest.json").read_text())
    assert manifest["schema_version"] == TEMPERED_SCHEMA
    code, out, err = run_cli(
        "ppo", "--model", tiny_model_dir, "--behaviour-logprobs", "recompute", "--max-steps", "1",
        "--questions-per-step", "2", "--questions-per-minibatch", "1", "--no-gradient-checkpointing",
        "--learning-rate", "1e-9", "--save-steps", "100", *home,
    )  # fmt: skip
    assert code == 0, err
    ppo = last_json(out)
    # the training forward at T = 0.3 gives the log-probs the sampler stored: the step-0 ratio is 1
    assert ppo["metrics"]["behaviour_logprob_gap"] < 1e-5, ppo["metrics"]
    first = next(
        json.loads(line)
        for line in (Path(ppo["path"]) / "metrics.jsonl").read_text().splitlines()
        if "kl" in json.loads(line)
    )
    assert abs(first["kl"]) < 1e-5 and first["clip_ratio/region_mean"] == 0, first


@pytest.mark.slow
def test_online_trainer_scores_at_the_temperature_it_samples_with(tiny_model_dir, tmp_path):
    """The online schedule moves `trainer.temperature`; the log-probs follow it (TRL's fused head
    would keep the temperature it was built with)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from looper.config import PpoConfig
    from looper.train.grpo import AdaptiveKLGRPOTrainer, grpo_config
    from looper.train.grpo_math import AdaptiveKL, step_plan
    from looper.train.trl_internals import fused_head_is_exact

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = AdaptiveKLGRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
        args=grpo_config(PpoConfig(), tmp_path, 2, 4, step_plan(1, 1, 1), temperature=1.0),
        train_dataset=Dataset.from_list([{"prompt": "2 + 2 ="}]),
        processing_class=tokenizer,
        kl_controller=AdaptiveKL(0.04, 0.0, 1.0),
    )
    ids = torch.tensor([tokenizer("2 + 2 = 4 and 3", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    trainer.temperature = 0.5  # what TemperatureSchedule does at a step's start
    with torch.no_grad():
        got, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 3)
        logits = model(ids).logits[0, -4:-1].float()
    want = torch.log_softmax(logits / 0.5, -1).gather(1, ids[0, -3:, None])[:, 0]
    assert torch.allclose(got[0], want, atol=1e-5)
    # the fused head (hidden states scaled into its temperature; where it scores labelled positions
    # only) agrees with the model's own logits divided per row (elsewhere), at two temperatures in one batch
    assert fused_head_is_exact(trainer.model, trainer.accelerator)
    two, temps = ids.repeat(2, 1), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        fused = trainer._fused_chunk(trainer.model, two, torch.ones_like(two), 3, temps, True, False)
        plain = trainer._logits_chunk(trainer.model, two, torch.ones_like(two), 3, temps, True, False)
    assert torch.allclose(fused[0], plain[0], atol=1e-5) and torch.allclose(fused[1], plain[1], atol=1e-4)
    assert not torch.allclose(fused[0][0], fused[0][1], atol=1e-2)  # each row at its own temperature


@pytest.mark.slow
def test_offline_step_matches_trl_grpo_on_the_same_completions(tiny_model_dir, tmp_path):
    """Looper's replay trainer (stored tempered log-probs, per-row temperatures through the scaled
    fused head, floored std) and TRL's own GRPOTrainer fed the same completions at the same
    temperature (its fused head built at 0.3, scale_rewards none) take the same first step: loss and
    gradient norm to 1e-5. The floor (1.0) is above every group's std, so both centre rewards only."""
    from datasets import Dataset
    from test_ppo import build_rollouts
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from looper.config import PpoConfig
    from looper.train.grpo import ReplayGRPOTrainer, arm_temperatures, grpo_config, replay_func
    from looper.train.grpo_math import AdaptiveKL, step_plan

    rows = build_rollouts(tmp_path / "home", tiny_model_dir)  # 2 questions x 4 arms at T = 0.3
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    components = {
        r["id"]: [{"correctness": 1.0 if a["correct"] else 0.0} for a in r["arm_outputs"]] for r in rows
    }

    def stored_correctness(completions, reward_correctness=None, **_):
        return reward_correctness

    config = PpoConfig(max_steps=1, questions_per_step=2, questions_per_minibatch=2, kl_coef=0.04, seed=0)
    logged = {}
    for name in ("looper", "trl"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        args = grpo_config(config, tmp_path / name, 4, 12, step_plan(2, 2, 2), temperature=0.3)
        common = dict(
            model=model,
            reward_funcs=[stored_correctness],
            args=args,
            train_dataset=Dataset.from_list([{"prompt": r["id"]} for r in rows]),
            processing_class=tokenizer,
            peft_config=None,
            rollout_func=replay_func(rows, tokenizer, 4, components),
        )
        if name == "looper":
            trainer = ReplayGRPOTrainer(
                **common,
                temperatures=arm_temperatures(rows),
                kl_controller=AdaptiveKL(0.04, 0.0, 1.0),
                std_floor=1.0,
            )
        else:
            trainer = GRPOTrainer(**common)
        trainer.train()
        logged[name] = next(h for h in trainer.state.log_history if "loss" in h)
    for key in ("loss", "grad_norm"):
        assert logged["looper"][key] == pytest.approx(logged["trl"][key], abs=1e-5), (key, logged)
