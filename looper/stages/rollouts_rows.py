"""The rows of `looper rollouts`: each chunk's requests (every arm of every question, then the s_cf
re-asks), one generate call for them, and each question's scored row (Regime W scores and rewards).
Kept beside the stage so `rollouts.run` reads top to bottom; the versions' identity is here too.
"""

from __future__ import annotations

from collections.abc import Callable

from looper.answers import extract_answer, is_correct
from looper.config import RolloutsConfig, identity
from looper.data.prompts import render_prompt, tutoring_messages
from looper.generation import Sampling
from looper.regime_w import scoring
from looper.regime_w.arms import Arm
from looper.regime_w.perturb import PERTURBATIONS, perturb
from looper.rewards import registry
from looper.stats import majority_vote


def reasoning_of(text: str) -> str:
    """The worked part of a completion: inside <think>...</think>, else everything before '####'."""
    if "</think>" in text:
        return text.split("</think>")[0].replace("<think>", "").strip()
    return text.rpartition("####")[0].strip() if "####" in text else text.strip()


def output_record(arm: Arm, prompt: str, completion, gold: str) -> dict:
    return {
        "arm": arm.name,
        "style": arm.style,
        "temperature": arm.temperature,
        "prompt": prompt,
        "text": completion.text,
        "reasoning": reasoning_of(completion.text),
        "answer": extract_answer(completion.text),
        "correct": is_correct(completion.text, gold),
        "tokens": completion.tokens,
        "finish_reason": completion.finish_reason,
        "token_ids": completion.token_ids,
        "logprobs": completion.logprobs,
    }


def reward_spec(config: RolloutsConfig) -> registry.RewardSpec:
    """The rewards these rollouts store: defaults < [rewards] table < --weights; s_wm as scored here."""
    return registry.resolve(config.rewards, config.weights, (config.w_end, config.w_path, config.w_cf))


def rollouts_identity(config: RolloutsConfig) -> dict:
    """The config's identity with the reward settings resolved (equal rewards, equal version)."""
    raw = {k: v for k, v in identity(config).items() if k not in ("rewards", "weights")}
    return raw | {"rewards": reward_spec(config).as_dict()}


def cf_skip(cf_names: list[str], spec: registry.RewardSpec) -> list[str]:
    """The s_cf re-asks not to generate: all of them when no stored reward reads s_cf (each costs a
    generation per question; s_cf is then 0, as online). ppo and rescore refuse to weigh it later."""
    if cf_names and not registry.reads_s_cf([n for n, w in spec.weights.items() if w], spec.params):
        print(f"rollouts: no s_cf re-asks ({', '.join(cf_names)}): no stored reward weighs s_cf")
        return cf_names
    return []


def score_row(row: dict, outputs: list[dict], cf_outputs: list[dict], config: RolloutsConfig) -> dict:
    answers = [o["answer"] for o in outputs]
    tokens = [o["tokens"] for o in outputs]
    by_arm = {o["arm"]: o["answer"] for o in outputs}
    majority = majority_vote(answers)  # a re-asked arm the bandit left out of the question is compared to it
    weights = scoring.RegimeWWeights(config.w_end, config.w_path, config.w_cf)
    scores = scoring.score_question(
        answers,
        tokens,
        [by_arm.get(c["arm"], majority) for c in cf_outputs],
        [c["answer"] for c in cf_outputs],
        weights,
    )
    scored = {
        "id": row["id"],
        "question": row["question"],
        "gold_answer": row["gold_answer"],
        "policy": config.policy,
        "arm_outputs": outputs,
        "cf_outputs": cf_outputs,
        **scores,
    }
    return scored | registry.row_rewards(scored, reward_spec(config))


def chunk_requests(
    rows: list[dict], arms: Callable[[dict], list[Arm]], cf_arms: list[Arm], tokenizer
) -> tuple[list[str], list[tuple]]:
    """(prompts, slots) of a chunk: every arm of every question, then its s_cf re-asks on a
    perturbed question. slot: (row index, "arm"|"cf", arm, (perturbation, question) or None)."""
    prompts, slots = [], []
    for i, row in enumerate(rows):
        for arm in arms(row):
            prompts.append(render_prompt(tokenizer, tutoring_messages(row["question"], arm.instruction)))
            slots.append((i, "arm", arm, None))
        for k, arm in enumerate(cf_arms):
            kind = PERTURBATIONS[k % len(PERTURBATIONS)]  # one perturbation per cf arm, alternating kinds
            question = perturb(row["question"], kind, key=row["id"])
            prompts.append(render_prompt(tokenizer, tutoring_messages(question, arm.instruction)))
            slots.append((i, "cf", arm, (kind, question)))
    return prompts, slots


def rollout_chunk(
    rows: list[dict],
    arms: Callable[[dict], list[Arm]],
    cf_arms: list[Arm],
    generator,
    tokenizer,
    config: RolloutsConfig,
    seed: int,
    on_progress,
) -> list[dict]:
    """All arms (`arms(row)`: each sample's arm) and the s_cf re-asks of the chunk's questions, in one call."""
    prompts, slots = chunk_requests(rows, arms, cf_arms, tokenizer)
    samplings = []
    for _, _, arm, _ in slots:
        samplings.append(
            Sampling(temperature=arm.temperature, top_p=arm.top_p, max_new_tokens=config.max_new_tokens)
        )
    completions = generator.generate(prompts, samplings, seed=seed, on_progress=on_progress)

    outputs = [[] for _ in rows]
    cf_outputs = [[] for _ in rows]
    for (i, kind, arm, extra), prompt, completion in zip(slots, prompts, completions):
        if kind == "arm":
            outputs[i].append(output_record(arm, prompt, completion, rows[i]["gold_answer"]))
        else:
            cf_outputs[i].append(
                {
                    "arm": arm.name,
                    "perturbation": extra[0],
                    "question": extra[1],
                    "text": completion.text,
                    "answer": extract_answer(completion.text),
                    "tokens": completion.tokens,
                }
            )
    return [score_row(row, outputs[i], cf_outputs[i], config) for i, row in enumerate(rows)]
