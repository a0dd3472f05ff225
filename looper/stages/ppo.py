"""`looper ppo`: offline policy optimisation on scored rollouts (GRPO-style), via TRL.

    looper ppo                                  # replay the latest rollouts, per-arm rewards
    looper ppo --reward question                # the reference recipe's shared question reward
    looper ppo --online --limit 200             # online GRPO: sample fresh groups each step

Offline (default), nothing is generated: TRL's `GRPOTrainer` gets a `rollout_func` that
hands back the stored completions of each question's arms (their exact prompts, token ids
and log-probs). Objective: the clipped PPO surrogate with group-relative advantages over
the arms of a question, plus a per-token KL penalty to the reference policy.

What we add to TRL, and why:
- `ReplayGRPOTrainer`: TRL uses stored log-probs only on its vLLM path. We set the
  importance ratio's denominator (`old_per_token_logps`) to the stored log-probs, so the
  ratio is taken against the behaviour policy that produced the rollouts and clipping
  bounds how far training moves from it. With `--reward question` every arm of a question
  shares one reward, so group-relative advantages would all be zero: we centre (and scale)
  rewards over the batch instead.
- `AdaptiveKL`: TRL's KL coefficient is fixed; we move it each step towards a target KL
  with Ziegler et al.'s (2019) proportional controller.

Reference and adapter: the reference policy is the one that generated the rollouts. From an
sft adapter, training continues that adapter and TRL keeps a frozen copy as the reference;
from the base model, a fresh LoRA is trained and the reference is the base (adapter off).
Simplification: a completion's EOS token is not trained on (rollouts store no log-prob for it).
"""

from __future__ import annotations

import shutil

import orjson
import torch
from trl import GRPOConfig, GRPOTrainer

from looper import models, training
from looper.artifacts import Store
from looper.config import PpoConfig, identity
from looper.errors import LooperError
from looper.rl import StepPlan, floored_advantages, step_plan
from looper.stages import StageResult

STAGE = "ppo"


class AdaptiveKL:
    """Ziegler et al. (2019): coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.target > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_samples / self.horizon
        return self.coef


class RegimeWGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose advantages divide by a floored std (`looper.rl.floored_advantages`).

    TRL runs with scale_rewards="none", so its advantages are the centred rewards r - group mean."""

    reward_mode = "arm"
    std_floor = 0.1

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        device = output["advantages"].device
        if self.reward_mode == "question":  # one shared reward per question: centre over the batch instead
            rewards = torch.tensor([x["stored_reward"] for x in inputs], dtype=torch.float32)
            output["advantages"] = floored_advantages(rewards, None, self.std_floor).to(device)
        else:  # centred rewards have the rewards' group std
            output["advantages"] = floored_advantages(output["advantages"].cpu(), self.num_generations,
                                                      self.std_floor).to(device)
        return output


class ReplayGRPOTrainer(RegimeWGRPOTrainer):
    """The trainer of offline ppo: its importance ratio uses the stored behaviour log-probs."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        # the stored log-probs come back padded as `sampling_per_token_logps` (rollout_func "logprobs")
        output["old_per_token_logps"] = output["sampling_per_token_logps"]
        return output


def kl_callback(controller: AdaptiveKL, trainer_ref: dict, n_samples: int):
    from transformers import TrainerCallback

    class AdaptiveKLCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "kl" in logs and "eval_loss" not in logs:
                trainer_ref["trainer"].beta = controller.update(float(logs["kl"]), n_samples)
                logs["kl_coef"] = trainer_ref["trainer"].beta  # logged with the step (metrics.jsonl)

    return AdaptiveKLCallback()


def stored_reward(completions, stored_reward, **kwargs) -> list[float]:
    """Reward function: the reward `looper rollouts` stored for each completion."""
    return list(stored_reward)


# Per-arm rewards, advantages taken within each question's arms: Regime W's stored arm reward,
# or correctness alone (1 right, 0 wrong), to measure what the coherence and length terms add.
ARM_REWARDS = {"arm": lambda arm, stored: stored, "correctness": lambda arm, stored: float(arm["correct"])}


def replay_func(rows: list[dict], tokenizer, reward_mode: str, n_arms: int):
    """A TRL rollout_func that returns the stored arms of each question instead of generating."""
    by_id = {r["id"]: r for r in rows}
    prompt_cache: dict[str, list[int]] = {}

    def encode(prompt: str) -> list[int]:
        if prompt not in prompt_cache:  # the chat template already holds BOS: add no special tokens
            prompt_cache[prompt] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return prompt_cache[prompt]

    def rollout_func(prompts: list[str], trainer) -> dict:
        prompt_ids, completion_ids, logprobs, rewards = [], [], [], []
        for question_id in prompts[::n_arms]:  # TRL repeats each prompt once per generation
            row = by_id[question_id]
            for arm, arm_reward in zip(row["arm_outputs"], row["arm_rewards"]):
                prompt_ids.append(encode(arm["prompt"]))
                completion_ids.append(list(arm["token_ids"]))
                logprobs.append(list(arm["logprobs"]))
                rewards.append(ARM_REWARDS[reward_mode](arm, arm_reward) if reward_mode in ARM_REWARDS
                               else row["reward"])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs,
                "stored_reward": rewards}

    return rollout_func


def grpo_config(config: PpoConfig, output_dir, n_arms: int, max_completion: int, plan: StepPlan,
                temperature: float = 1.0) -> GRPOConfig:
    cuda = models.has_cuda()
    return GRPOConfig(
        **training.trainer_args(config, cuda),
        output_dir=str(output_dir),
        per_device_train_batch_size=config.questions_per_minibatch * n_arms,  # completions, all arms of each question
        gradient_accumulation_steps=plan.micro_batches,
        num_generations=n_arms,
        max_completion_length=max_completion,
        temperature=temperature,  # offline: 1, the temperature of the stored log-probs
        learning_rate=config.learning_rate,
        max_grad_norm=config.max_grad_norm,
        beta=config.kl_coef,
        epsilon=config.clip_epsilon,
        loss_type=config.loss_type,
        scale_rewards="none",  # centred only: RegimeWGRPOTrainer divides by the floored group std
        disable_dropout=True,  # dropout in the forwards that form the ratio and the KL would read as policy change
    )


def run(config: PpoConfig) -> StageResult:
    if config.online:
        from looper.stages.ppo_online import run_online

        return run_online(config)
    if config.reward not in ("arm", "question", "correctness"):
        raise LooperError(f"--reward {config.reward}: choose arm, question or correctness")
    store = Store(config.workdir)
    rollouts, base, quant = training.rollouts_input(store, config)
    stage_identity = identity(config) | {"model": base.identity, "quant": quant}
    version = store.version_for(STAGE, stage_identity, {"rollouts": rollouts})
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)

    rows = training.rollout_rows(rollouts)
    n_arms = len(rows[0]["arm_outputs"])
    if n_arms < 2:
        raise LooperError("rollouts with one arm give no group to compare: rerun `looper rollouts --arms 2` or more")
    flat = sum(len(set(r["arm_rewards"])) <= 1 for r in rows)
    print(f"ppo: {len(rows)} questions x {n_arms} arms; {flat} question group(s) have zero reward variance"
          + (" (they teach nothing under --reward arm)" if config.reward == "arm" else ""))
    plan = step_plan(len(rows), config.questions_per_step, config.questions_per_minibatch)
    announce_plan(plan, len(rows), config.questions_per_step)

    from datasets import Dataset

    run_ = store.begin(STAGE, version, resume=config.resume and not config.force)
    tokenizer = models.load_tokenizer(base, trust_remote_code=config.trust_remote_code)
    adapter_path = rollouts.manifest.get("policy", {}).get("adapter_path")
    model, peft_config = training.policy_model(config, base, adapter_path, quant)
    controller = AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon)
    trainer_dir = run_.path / "trainer"
    checkpoint = training.last_checkpoint(trainer_dir)
    if checkpoint and (run_.path / "kl_coef.json").is_file():  # the controller's state at the last save
        controller.coef = orjson.loads((run_.path / "kl_coef.json").read_bytes())["coef"]
    holder: dict = {}
    max_completion = max(len(a["token_ids"]) for r in rows for a in r["arm_outputs"]) or 1
    trainer = ReplayGRPOTrainer(
        model=model,
        reward_funcs=[stored_reward],
        args=grpo_config(config, trainer_dir, n_arms, max_completion, plan),
        train_dataset=Dataset.from_list([{"prompt": r["id"]} for r in rows]),
        processing_class=tokenizer,
        peft_config=peft_config,
        rollout_func=replay_func(rows, tokenizer, config.reward, n_arms),
        callbacks=[kl_callback(controller, holder, config.questions_per_step * n_arms),
                   training.metrics_callback(run_.path / "metrics.jsonl"), save_kl_callback(controller, run_.path)],
    )
    trainer.beta, trainer.reward_mode, trainer.std_floor = controller.coef, config.reward, config.advantage_std_floor
    holder["trainer"] = trainer
    if checkpoint:
        print(f"ppo: resuming from {checkpoint.rsplit('/', 1)[-1]}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if not trainer.accelerator.is_main_process:
        return StageResult(STAGE, version, str(store.stage_root(STAGE) / version))

    training.save_adapter(trainer.model, tokenizer, run_.path)
    shutil.rmtree(trainer_dir, ignore_errors=True)
    (run_.path / "kl_coef.json").unlink(missing_ok=True)
    artifact = run_.commit(
        config=orjson.loads(orjson.dumps(vars(config))), inputs={"rollouts": rollouts}, identity=stage_identity,
        counts={"questions": len(rows), "arms": n_arms, "zero_variance_groups": flat,
                "steps": trainer.state.global_step},
        metrics={"train_loss": result.training_loss, "final_kl_coef": controller.coef},
        extra={"base_model": {"spec": base.spec, "identity": base.identity}, "quant": quant,
               "reference": adapter_path or "base", "loss_type": config.loss_type, "reward": config.reward},
    )
    return StageResult.from_artifact(artifact)


def announce_plan(plan: StepPlan, n_questions: int, questions_per_step: int) -> None:
    print(f"ppo: {plan.steps_per_epoch} optimizer step(s) per epoch of {questions_per_step} questions"
          + (f"; {plan.left_out} of the {n_questions} questions are left out of each epoch (a different random "
             f"{plan.left_out} each time)" if plan.left_out else ""))


def save_kl_callback(controller: AdaptiveKL, run_dir):
    """Keep the KL coefficient with each checkpoint so a resumed run continues the controller."""
    from transformers import TrainerCallback

    class SaveKL(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            (run_dir / "kl_coef.json").write_bytes(orjson.dumps({"step": state.global_step, "coef": controller.coef}))

    return SaveKL()
