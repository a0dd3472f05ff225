"""One BOS everywhere: for the same question, every stage presents the model with the same prompt ids.

An R1-shaped tiny model (`looper.policy.tiny.r1_tokenizer`: the tokenizer adds BOS to any text, the
chat template begins with `{{ bos_token }}`, the generation prompt pre-fills `<think>\\n`), and
the prompt ids each stage really produces: generation's (rollouts and eval, captured at
`model.generate`), TRL's own dataset preparation in SFTTrainer and DPOTrainer, the ids offline
ppo's replay hands GRPOTrainer (through TRL's `_generate`), and TRL's tokenization of online
ppo's prompts (`GRPOTrainer._tokenize_prompts`). Tokenized naively with special tokens, this
tokenizer gives two BOS; every stage must give exactly one, and the same ids.
"""

from __future__ import annotations

import pytest

from looper.data.prompts import (
    INSTRUCTION,
    prompt_token_ids,
    render_prompt,
    trl_prompt,
    tutoring_messages,
)
from looper.errors import LooperError
from looper.policy.tiny import r1_tokenizer, tiny_model, tiny_tokenizer

QUESTION = "Ann has 5 apples and buys 3 more. How many apples does she have now?"


@pytest.fixture(scope="module")
def r1_tok():
    return r1_tokenizer()


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model(tmp_path_factory.mktemp("r1"), tokenizer=r1_tokenizer())
    tokenizer = AutoTokenizer.from_pretrained(path)
    expected = prompt_token_ids(tokenizer, render_prompt(tokenizer, tutoring_messages(QUESTION)))
    return path, tokenizer, AutoModelForCausalLM.from_pretrained(path), expected


def test_r1_tokenizer_really_doubles_bos_and_trl_prompt_undoes_it(r1_tok):
    tokenizer = r1_tok
    text = render_prompt(tokenizer, tutoring_messages(QUESTION))
    expected = prompt_token_ids(tokenizer, text)
    bos = tokenizer.bos_token_id
    assert text.startswith(tokenizer.bos_token) and text.endswith("<think>\n")
    assert tokenizer(text)["input_ids"][:2] == [bos, bos]  # the bug: template BOS + tokenizer BOS
    assert expected[0] == bos and expected.count(bos) == 1
    assert tokenizer(trl_prompt(tokenizer, text))["input_ids"] == expected
    chatml = tiny_tokenizer()  # adds nothing: the text is handed over as it is
    plain = render_prompt(chatml, tutoring_messages(QUESTION))
    assert trl_prompt(chatml, plain) == plain


def test_trl_prompt_refuses_a_bos_the_template_does_not_write(r1_tok):
    with pytest.raises(LooperError, match="does not begin the prompt with it"):
        trl_prompt(r1_tok, "<｜User｜>hi<｜Assistant｜>")


def spy_generate(model, seen: list):
    """Record the unpadded prompt ids of every `model.generate` call, then generate as usual."""
    real = model.generate

    def generate(*args, input_ids, attention_mask, **kwargs):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return real(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    return generate


def zero_reward(completions, **kwargs) -> list[float]:
    return [0.0] * len(completions)


@pytest.mark.slow
def test_every_stage_presents_identical_prompt_ids(r1, tmp_path, monkeypatch):
    from datasets import Dataset
    from trl import DPOTrainer

    from looper.config import DpoConfig, EvalConfig, PpoConfig, RolloutsConfig, SftConfig
    from looper.eval import questions
    from looper.generation import Sampling
    from looper.generation.hf import HFGenerator
    from looper.policy import models
    from looper.policy.policies import Policy
    from looper.regime_w.arms import Arm
    from looper.stages import dpo, ppo, ppo_online, rollouts_rows
    from looper.train import grpo
    from looper.train import sft as sft_training
    from looper.train.grpo_math import AdaptiveKL, step_plan

    path, tokenizer, model, expected = r1
    seen: dict[str, list[int]] = {}

    # rollouts: the stage's own chunk function, through the hf generator (two arms, the default instruction)
    generated: list = []
    monkeypatch.setattr(model, "generate", spy_generate(model, generated))
    arms = (Arm("plain-t0.7", INSTRUCTION, 0.7), Arm("plain-t1", INSTRUCTION, 1.0))
    row = {"id": "q1", "question": QUESTION, "gold_answer": "8"}
    chunk = rollouts_rows.rollout_chunk(
        [row],
        lambda _: list(arms),
        [],
        HFGenerator(model, tokenizer),
        tokenizer,
        RolloutsConfig(max_new_tokens=4),
        0,
        None,
    )
    rollout_rows = ppo.with_tokens(chunk)[0]
    assert generated[0] == generated[1]
    seen["rollouts"] = generated[0]

    # eval: the stage's prompts (chat format), generated without log-probs
    generated.clear()
    prompts = questions.build_prompts(
        Policy("base", models.resolve_model(str(path))),
        [{"prompt": tutoring_messages(QUESTION)}],
        EvalConfig(),
        [[]],
    )
    HFGenerator(model, tokenizer).generate(prompts, Sampling(max_new_tokens=2), logprobs=False)
    seen["eval"] = generated[0]
    monkeypatch.undo()

    # sft: TRL's SFTTrainer prepares the dataset; the prompt is what the loss leaves out
    trainer = sft_training.build_trainer(
        SftConfig(max_length=512),
        tmp_path / "sft",
        model,
        tokenizer,
        [{"prompt": tutoring_messages(QUESTION), "solution": "5 + 3 = 8\n#### 8"}],
        [],
    )
    example = trainer.train_dataset[0]  # labels: -100 on the prompt (completion-only loss)
    seen["sft"] = example["input_ids"][: next(i for i, x in enumerate(example["labels"]) if x != -100)]

    # ppo offline: TRL's `_generate` runs the replay rollout_func on the stored arms
    plan = step_plan(1, 1, 1)
    replay = grpo.ReplayGRPOTrainer(
        model=model,
        reward_funcs=[zero_reward],
        args=grpo.grpo_config(PpoConfig(), tmp_path / "ppo", 2, 4, plan),
        train_dataset=Dataset.from_list([{"prompt": "q1"}]),
        processing_class=tokenizer,
        peft_config=None,
        rollout_func=grpo.replay_func(rollout_rows, tokenizer, 2, {"q1": [{}, {}]}),
        kl_controller=AdaptiveKL(0.04, 0.0, 1.0),
    )
    prompt_ids = replay._generate(["q1", "q1"])[0]
    assert prompt_ids[0] == prompt_ids[1]
    seen["ppo"] = list(prompt_ids[0])

    # ppo --online: TRL tokenizes the stage's dataset prompts itself
    online = grpo.RegimeWGRPOTrainer(
        model=model,
        reward_funcs=[zero_reward],
        args=grpo.grpo_config(PpoConfig(), tmp_path / "online", 2, 4, plan),
        train_dataset=ppo_online.online_dataset([row], tokenizer),
        processing_class=tokenizer,
        kl_controller=AdaptiveKL(0.04, 0.0, 1.0),
    )
    seen["ppo --online"] = list(online._tokenize_prompts([online.train_dataset[0]["prompt"]])[0][0])

    # dpo: TRL's DPOTrainer prepares the pair built from the stored arms' prompt
    arm = rollout_rows[0]["arm_outputs"][0]
    pair = {"prompt": arm["prompt"], "chosen": "5 + 3 = 8\n#### 8", "rejected": "5 - 3 = 2\n#### 2"}
    trainer = DPOTrainer(
        model=model,
        args=dpo.dpo_config(DpoConfig(), tmp_path / "dpo", dpo.max_length([pair], tokenizer)),
        train_dataset=dpo.pair_dataset([pair], tokenizer),
        processing_class=tokenizer,
    )
    seen["dpo"] = trainer.train_dataset[0]["prompt_ids"]

    assert {stage: ids for stage, ids in seen.items() if ids != expected} == {}
    assert set(seen) == {"rollouts", "eval", "sft", "ppo", "ppo --online", "dpo"}


def test_continuous_scheduler_prefills_the_one_bos_ids(r1):
    """The default hf scheduler (continuous) presents the same prompt ids as every other stage."""
    from looper.generation import Sampling
    from looper.generation.continuous import ContinuousGenerator

    path, tokenizer, model, expected = r1
    seen = []
    real_forward = model.forward

    def forward(*args, input_ids=None, **kwargs):
        seen.append(input_ids[0].tolist())
        return real_forward(*args, input_ids=input_ids, **kwargs)

    model.forward = forward
    try:
        text = render_prompt(tokenizer, tutoring_messages(QUESTION))
        ContinuousGenerator(model, tokenizer, batch_size=1).generate([text], Sampling(max_new_tokens=2))
    finally:
        del model.forward
    assert seen[0] == expected
