"""`looper ppo --online`: online GRPO, sampling a fresh group per question at each step.

The questions, starting policy and reference are those of the rollouts artifact (as
offline). Each step TRL generates `--online-generations` completions per question from the
current policy in one prompt style at `--online-temperature` (vLLM on GPU when TRL is set up
for it, transformers otherwise) and scores them with the per-arm reward, whose coherence
term is computed over that group: agreement with the group's other answers blended with
the group's s_wm, with the s_wm weights and blend the rollouts were scored with. There is
no s_cf online (it would need extra generations per step): its weight counts as 0, which only
shifts a whole group's rewards and so leaves advantages alone.
"""

from __future__ import annotations

from looper import models, training
from looper.answers import extract_answer, is_correct
from looper.artifacts import Store
from looper.config import PpoConfig, RolloutsConfig, identity
from looper.data.prompts import render_prompt, tutoring_messages
from looper.generation.hf import eos_token_ids
from looper.regime_w import reward, scoring
from looper.rl import AdaptiveKL, kl_horizon, step_plan, total_steps
from looper.stages import StageResult
from looper.stages.ppo import RegimeWGRPOTrainer, announce_plan, grpo_config

STAGE = "ppo"


def reward_settings(rollouts_config: dict) -> tuple[scoring.RegimeWWeights, float]:
    """The s_wm weights and coherence blend the rollouts were scored with (their defaults where unset)."""
    defaults = RolloutsConfig()
    get = lambda key: float(rollouts_config.get(key, getattr(defaults, key)))  # noqa: E731
    return scoring.RegimeWWeights(get("w_end"), get("w_path"), get("w_cf")), get("coherence_blend")


def group_reward_func(group_size: int, weights: scoring.RegimeWWeights, blend: float, eos_ids=()):
    """A TRL reward function: per-arm Regime W rewards computed over each group of completions.

    TRL's completion ids end with the EOS that stopped them; like rollouts' `tokens`, the
    length scored does not count it."""

    def online_arm_reward(completions, gold_answer, completion_ids, **kwargs) -> list[float]:
        rewards = []
        for start in range(0, len(completions), group_size):
            texts = completions[start : start + group_size]
            tokens = [
                len(ids) - bool(ids and ids[-1] in eos_ids)
                for ids in completion_ids[start : start + group_size]
            ]
            answers = [extract_answer(t) for t in texts]
            correct = [is_correct(t, g) for t, g in zip(texts, gold_answer[start : start + group_size])]
            s_wm = scoring.s_wm(scoring.s_end(answers), scoring.s_path(tokens), 0.0, weights)
            rewards += reward.arm_rewards(correct, tokens, answers, s_wm, blend=blend)
        return rewards

    return online_arm_reward


def run_online(config: PpoConfig) -> StageResult:
    from datasets import Dataset

    store = Store(config.workdir, wait=config.wait)
    rollouts, base, quant = training.rollouts_input(store, config)
    stage_identity = identity(config) | {"model": base.identity, "quant": quant}
    version = store.version_for(STAGE, stage_identity, {"rollouts": rollouts})
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)
    rows = training.rollout_rows(rollouts)
    plan = step_plan(len(rows), config.questions_per_step, config.questions_per_minibatch)
    announce_plan(plan, len(rows), config.questions_per_step)

    job = training.TrainingRun.begin(store, STAGE, version, config, base=base, quant=quant)
    tokenizer = models.load_tokenizer(base, trust_remote_code=config.trust_remote_code)
    adapter_path = rollouts.manifest.get("policy", {}).get("adapter_path")
    model, peft_config = training.policy_model(config, base, adapter_path, quant)
    group = config.online_generations
    dataset = Dataset.from_list(
        [
            {
                "prompt": render_prompt(tokenizer, tutoring_messages(r["question"])),
                "gold_answer": r["gold_answer"],
            }
            for r in rows
        ]
    )
    controller = AdaptiveKL(
        config.kl_coef,
        config.kl_target,
        kl_horizon(config.kl_horizon, total_steps(config.max_steps, config.epochs, plan)),
    )
    weights, blend = reward_settings(rollouts.manifest.get("config", {}))
    trainer = RegimeWGRPOTrainer(
        model=model,
        reward_funcs=[group_reward_func(group, weights, blend, set(eos_token_ids(model, tokenizer)))],
        args=grpo_config(
            config, job.trainer_dir, group, config.max_new_tokens, plan, temperature=config.online_temperature
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=job.callbacks(),
        kl_controller=controller,
        std_floor=config.advantage_std_floor,
    )
    trainer.restore_kl(job.checkpoint)
    result = job.train(trainer)
    return job.finish(
        trainer,
        tokenizer,
        inputs={"rollouts": rollouts},
        identity=stage_identity,
        counts={"questions": len(rows), "group_size": group, "steps": trainer.state.global_step},
        metrics={"train_loss": job.train_loss(result, trainer), "final_kl_coef": controller.coef},
        extra={"reference": adapter_path or "base", "loss_type": config.loss_type, "mode": "online"},
    )
