"""`looper ppo --online`: online GRPO, sampling a fresh group per question at each step.

The questions, starting policy and reference are those of the rollouts artifact (as
offline). Each step TRL generates `--online-generations` completions per question from the
current policy in one prompt style at `--online-temperature` (moving to `--online-temperature-end`
over the run when set; vLLM on GPU when TRL is set up for it, transformers otherwise) and
scores them with the same registry functions as offline (`looper.rewards.registry`, weighted by the
`[rewards]` table and `--weights`), group-level terms computed over each question's group,
s_wm with the weights the rollouts were scored with. There is no s_cf online (it would need
extra generations per step): it counts as 0, which only shifts a whole group's rewards and so
leaves advantages alone.
"""

from __future__ import annotations

from transformers import TrainerCallback

from looper.config import PpoConfig
from looper.data.prompts import render_prompt, trl_prompt, tutoring_messages
from looper.generation.hf import eos_token_ids
from looper.policy import models
from looper.rewards import schedules
from looper.rewards.trainer_adapter import online_reward_funcs, ppo_identity, reward_plan
from looper.stages import StageResult
from looper.store.artifacts import Store
from looper.train import runner
from looper.train.grpo import AdaptiveKLGRPOTrainer, announce_plan, build_trainer
from looper.train.grpo_math import step_plan

STAGE = "ppo"


class TemperatureSchedule(TrainerCallback):
    """Moves the sampling temperature from --online-temperature to --online-temperature-end over the run
    (TRL samples, and scores log-probs, at `trainer.temperature`)."""

    def __init__(self, trainer, start: float, end: float, shape: str):
        self.trainer = trainer
        self.points = [schedules.Point(0.0, start), schedules.Point(1.0, end, shape)]

    def on_step_begin(self, args, state, control, **kwargs):
        temperature = schedules.value_at(self.points, state.global_step / max(state.max_steps, 1))
        self.trainer.temperature = temperature
        if getattr(self.trainer, "generation_config", None) is not None:
            self.trainer.generation_config.temperature = temperature


def online_dataset(rows: list[dict], tokenizer):
    """The questions as TRL prompts: rendered as rollouts render them, handed over by `trl_prompt`
    (TRL tokenizes string prompts with special tokens: one BOS, as generation had)."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": trl_prompt(tokenizer, render_prompt(tokenizer, tutoring_messages(r["question"]))),
                "gold_answer": r["gold_answer"],
                "group": r[
                    "id"
                ],  # group-level rewards (agreement, coherence) are over a question's generations
            }
            for r in rows
        ]
    )


def run_online(config: PpoConfig) -> StageResult:
    store = Store(config.workdir, wait=config.wait)
    rollouts, base, quant = runner.rollouts_input(store, config)
    rewards_plan = reward_plan(
        config.rewards, config.weights, config.reward, rollouts.manifest.get("config", {})
    )
    stage_identity = ppo_identity(config, rewards_plan) | {"model": base.identity, "quant": quant}
    version = store.version_for(STAGE, stage_identity, {"rollouts": rollouts})
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)
    rows = runner.rollout_rows(rollouts)
    plan = step_plan(len(rows), config.questions_per_step, config.questions_per_minibatch)
    announce_plan(plan, len(rows), config.questions_per_step)

    # the rollouts' adapter, found in this home and checked against --model before anything is written
    adapter_path, base_mismatch = runner.rollouts_adapter(store, rollouts, base, config)
    tokenizer = models.load_tokenizer(base, trust_remote_code=config.trust_remote_code)
    model, peft_config = runner.policy_model(config, base, adapter_path, quant)
    job = runner.TrainingRun.begin(store, STAGE, version, config, base=base, quant=quant)  # once loaded
    group = config.online_generations
    dataset = online_dataset(rows, tokenizer)
    trainer = build_trainer(
        AdaptiveKLGRPOTrainer,
        config,
        job,
        plan,
        rewards_plan,
        generations=group,
        max_completion=config.max_new_tokens,
        temperature=config.online_temperature,
        model=model,
        reward_funcs=online_reward_funcs(rewards_plan, set(eos_token_ids(model, tokenizer))),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if config.online_temperature_end is not None:
        trainer.add_callback(
            TemperatureSchedule(
                trainer,
                config.online_temperature,
                config.online_temperature_end,
                config.online_temperature_shape,
            )
        )
    result = job.train(trainer)
    return job.finish(
        trainer,
        tokenizer,
        inputs={"rollouts": rollouts},
        identity=stage_identity,
        counts={"questions": len(rows), "group_size": group, "steps": trainer.state.global_step},
        metrics={"train_loss": job.train_loss(result, trainer), "final_kl_coef": trainer.kl_controller.coef},
        extra={
            "reference": store.relative(adapter_path) if adapter_path else "base",
            "base_mismatch_allowed": base_mismatch,
            "loss_type": config.loss_type,
            "mode": "online",
            "rewards": rewards_plan.identity(),
        },
    )
