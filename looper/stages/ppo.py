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
  rewards over the batch instead. `--behaviour-logprobs recompute` (or `auto`, when the rollouts
  were sampled with other weights: vLLM bf16 for an NF4 policy) first scores the stored
  completions with the training model and takes the ratio against those.
- `RegimeWGRPOTrainer`: TRL's KL coefficient is fixed; we move it after every optimizer step
  towards `--kl-target` (nats per token) with `looper.rl.AdaptiveKL`, saved with each checkpoint;
  advantages divide by a floored group std (`--advantage-std-floor`); dropout is off in every
  forward (TRL's `disable_dropout`), so the ratio and the KL measure policy change, not noise.

Reference and adapter: the reference policy is the one that generated the rollouts. From an
sft adapter, training continues that adapter and TRL keeps a frozen copy as the reference;
from the base model, a fresh LoRA is trained and the reference is the base (adapter off).
A completion's EOS token is part of its stored token ids and log-probs (rollouts schema 2), so
the model is trained to stop where its rewarded completions stopped; older rollouts are refused.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from looper import distributed, models, training
from looper.artifacts import Store
from looper.config import PpoConfig
from looper.data.prompts import prompt_token_ids
from looper.errors import LooperError
from looper.reward_training import (
    RewardPlan,
    ScheduledWeights,
    plot_weights,
    ppo_identity,
    reward_plan,
    row_components,
    stored_reward_funcs,
)
from looper.rl import (
    AdaptiveKL,
    StepPlan,
    behaviour_logprobs_source,
    floored_advantages,
    kl_horizon,
    skip_flat,
    step_plan,
    total_steps,
    with_tokens,
)
from looper.stages import StageResult

STAGE = "ppo"


class RegimeWGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with Looper's advantages and adaptive KL coefficient (offline and online).

    Advantages divide by a floored std (`looper.rl.floored_advantages`); TRL runs with
    scale_rewards="none", so its advantages are the centred rewards r - group mean.
    The KL coefficient (`self.beta`) moves after every optimizer step (`looper.rl.AdaptiveKL`)
    on the mean KL of that step's micro-batches, whatever `logging_steps` is; the controller's
    state is written into each checkpoint before transformers' trainer_state.json, so a
    complete checkpoint always has it and a resumed run continues it."""

    KL_STATE = "kl_controller.json"

    def __init__(
        self,
        *args,
        kl_controller: AdaptiveKL,
        reward_mode: str = "arm",
        std_floor: float = 0.1,
        reward_plan: RewardPlan | None = None,
        **kwargs,
    ):
        self.kl_controller, self.reward_mode, self.std_floor, self.step_kls = (
            kl_controller,
            reward_mode,
            std_floor,
            [],
        )
        self.post = reward_plan.post_processors() if reward_plan else []
        callbacks = [*kwargs.pop("callbacks", []), KLStep(self)]
        super().__init__(*args, callbacks=callbacks, **kwargs)
        if reward_plan is not None:  # after TRL set its weights: the schedule's, before every step
            self.add_callback(ScheduledWeights(self, reward_plan))
        self.beta = kl_controller.coef

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self.model.training and self._metrics["train"].get(
            "kl"
        ):  # TRL's per-micro-batch KL, all ranks gathered
            self.step_kls.append(self._metrics["train"]["kl"][-1])
        return loss

    def end_of_step(self) -> None:
        if self.step_kls:
            self.beta = self.kl_controller.update(sum(self.step_kls) / len(self.step_kls))
            self.step_kls.clear()

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training log line: the coefficient in force for the next step
            logs["kl_coef"] = self.beta
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / self.KL_STATE).write_bytes(orjson.dumps(self.kl_controller.state_dict()))
        super()._save_checkpoint(model, trial)

    def restore_kl(self, checkpoint: str | None) -> None:
        """The controller's state as saved with `checkpoint` (a resumed run)."""
        path = Path(checkpoint or "") / self.KL_STATE
        if checkpoint and path.is_file():
            self.kl_controller.load_state_dict(orjson.loads(path.read_bytes()))
            self.beta = self.kl_controller.coef
        elif checkpoint:
            print(f"ppo: {checkpoint} holds no KL controller state: the coefficient restarts at {self.beta}")

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self.rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self.rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        device, local = output["advantages"].device, len(output["advantages"])
        # the weighted total of all processes (as TRL sums it), post-processed in the configured order
        per_func = self.rewards_per_func.cpu()
        total = (per_func * self.reward_weights.cpu().unsqueeze(0)).nansum(dim=1)
        for post in self.post:
            total = post(total)
        # --reward question: one shared reward per question, so centre over the batch instead of the group
        group = None if self.reward_mode == "question" else self.num_generations
        advantages = floored_advantages(total, group, self.std_floor)
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local].to(device)
        return output


class ReplayGRPOTrainer(RegimeWGRPOTrainer):
    """The trainer of offline ppo: its importance ratio uses the stored behaviour log-probs."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        # the stored log-probs come back padded as `sampling_per_token_logps` (rollout_func "logprobs")
        output["old_per_token_logps"] = output["sampling_per_token_logps"]
        return output


class KLStep(TrainerCallback):
    """Moves the trainer's KL coefficient after each optimizer step."""

    def __init__(self, trainer: RegimeWGRPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.end_of_step()


def recompute_behaviour_logprobs(trainer: GRPOTrainer, rows: list[dict], encode, batch_size: int) -> float:
    """Replace each stored completion's log-probs by the training model's (before any update, dropout
    off, TRL's own forward); returns the mean |stored - recomputed| per token."""
    from trl.trainer.utils import pad

    arms, pad_id = [a for r in rows for a in r["arm_outputs"]], trainer.processing_class.pad_token_id
    gap = tokens = 0.0
    device = trainer.accelerator.device
    with torch.no_grad():
        for start in range(0, len(arms), batch_size):
            chunk = arms[start : start + batch_size]
            prompts = [torch.tensor(encode(a["prompt"])) for a in chunk]
            completions = [torch.tensor(list(a["token_ids"])) for a in chunk]
            ones = lambda ids: [torch.ones_like(x) for x in ids]  # noqa: E731
            input_ids = torch.cat(
                [pad(prompts, pad_id, padding_side="left"), pad(completions, pad_id, padding_side="right")],
                dim=1,
            ).to(device)
            mask = torch.cat(
                [pad(ones(prompts), 0, padding_side="left"), pad(ones(completions), 0, padding_side="right")],
                dim=1,
            ).to(device)
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, input_ids, mask, max(map(len, completions))
            )
            for arm, new in zip(chunk, logps.float().cpu().tolist()):
                new = new[: len(arm["token_ids"])]
                gap += sum(abs(x - y) for x, y in zip(new, arm["logprobs"]))
                tokens += len(new)
                arm["logprobs"] = new
    return gap / max(tokens, 1)


def prompt_encoder(tokenizer):
    """Prompt string -> token ids, as rollouts generated from them (cached: arms share prompts)."""
    cache: dict[str, list[int]] = {}

    def encode(prompt: str) -> list[int]:
        if prompt not in cache:
            cache[prompt] = prompt_token_ids(tokenizer, prompt)
        return cache[prompt]

    return encode


def replay_func(rows: list[dict], tokenizer, n_arms: int, components: dict[str, list[dict]]):
    """A TRL rollout_func that returns the stored arms of each question instead of generating, with
    each arm's reward components (`components`: question id -> per arm {name: value}) as columns
    `reward_<name>` for the reward functions."""
    by_id = {r["id"]: r for r in rows}
    encode = prompt_encoder(tokenizer)

    def rollout_func(prompts: list[str], trainer) -> dict:
        prompt_ids, completion_ids, logprobs, columns = [], [], [], {}
        for question_id in prompts[::n_arms]:  # TRL repeats each prompt once per generation
            row = by_id[question_id]
            for arm, parts in zip(row["arm_outputs"], components[question_id]):
                prompt_ids.append(encode(arm["prompt"]))
                completion_ids.append(list(arm["token_ids"]))
                logprobs.append(list(arm["logprobs"]))
                for name, value in parts.items():
                    columns.setdefault(f"reward_{name}", []).append(value)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs, **columns}

    return rollout_func


def grpo_config(
    config: PpoConfig,
    output_dir,
    n_arms: int,
    max_completion: int,
    plan: StepPlan,
    temperature: float = 1.0,
    reward_weights: list[float] | None = None,
) -> GRPOConfig:
    cuda = models.has_cuda()
    # --questions-per-step is the global step, split over the processes of a torchrun launch in whole
    # questions (a process holds every arm of its questions: their group advantage is taken there)
    questions, micro_batches = distributed.split_batch(config.questions_per_minibatch, plan.micro_batches)
    return GRPOConfig(
        **training.trainer_args(config, cuda),
        output_dir=str(output_dir),
        per_device_train_batch_size=questions * n_arms,  # completions, all arms of each question
        gradient_accumulation_steps=micro_batches,
        num_generations=n_arms,
        max_completion_length=max_completion,
        temperature=temperature,  # offline: 1, the temperature of the stored log-probs
        learning_rate=config.learning_rate,
        max_grad_norm=config.max_grad_norm,
        beta=config.kl_coef,
        epsilon=config.clip_epsilon,
        loss_type=config.loss_type,
        reward_weights=reward_weights,
        scale_rewards="none",  # centred only: RegimeWGRPOTrainer divides by the floored group std
        disable_dropout=True,  # dropout in the forwards that form the ratio and the KL would read as policy change
    )


def run(config: PpoConfig) -> StageResult:
    if config.online:
        from looper.stages.ppo_online import run_online

        return run_online(config)
    if config.reward not in ("arm", "question", "correctness"):
        raise LooperError(f"--reward {config.reward}: choose arm, question or correctness")
    store = Store(config.workdir, wait=config.wait)
    rollouts, base, quant = training.rollouts_input(store, config)
    objective = reward_plan(
        config.rewards, config.weights, config.reward, rollouts.manifest.get("config", {})
    )
    stage_identity = ppo_identity(config, objective) | {"model": base.identity, "quant": quant}
    version = store.version_for(STAGE, stage_identity, {"rollouts": rollouts})
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)

    if rollouts.manifest.get("schema_version", 1) < 2:
        raise LooperError(
            f"rollouts {rollouts.version} are schema {rollouts.manifest.get('schema_version', 1)}: "
            "written before the EOS token was stored, so replay would never train stopping; "
            "rerun `looper rollouts`"
        )
    rows, empty = with_tokens(training.rollout_rows(rollouts))
    training_weights = {
        "backend": "hf",
        "quant": quant,
        "dtype": "bfloat16" if models.has_cuda() else "float32",
    }
    behaviour, why = behaviour_logprobs_source(
        config.behaviour_logprobs, rollouts.manifest.get("generated_by"), training_weights
    )
    n_arms = len(rows[0]["arm_outputs"])
    if n_arms < 2:
        raise LooperError(
            "rollouts with one arm give no group to compare: rerun `looper rollouts --arms 2` or more"
        )
    components = row_components(rows, objective, rollouts.manifest, config.reward)
    flat_ids = {r["id"] for r in rows if len({tuple(c.values()) for c in components[r["id"]]}) <= 1}
    flat = len(flat_ids)
    print(
        f"ppo: {len(rows)} questions x {n_arms} arms; {flat} question group(s) have zero reward variance"
        + (" (they teach nothing under --reward arm)" if config.reward == "arm" else "")
    )
    rolled_out = len(rows)
    if config.skip_flat_groups:
        rows = skip_flat(rows, flat_ids, config.reward)
    plan = step_plan(len(rows), config.questions_per_step, config.questions_per_minibatch)
    announce_plan(plan, len(rows), config.questions_per_step)

    from datasets import Dataset

    # the rollouts' adapter, found in this home and checked against --model before anything is written
    adapter_path, base_mismatch = training.rollouts_adapter(store, rollouts, base, config)
    job = training.TrainingRun.begin(store, STAGE, version, config, base=base, quant=quant)
    tokenizer = models.load_tokenizer(base, trust_remote_code=config.trust_remote_code)
    model, peft_config = training.policy_model(config, base, adapter_path, quant)
    controller = AdaptiveKL(
        config.kl_coef,
        config.kl_target,
        kl_horizon(config.kl_horizon, total_steps(config.max_steps, config.epochs, plan)),
    )
    max_completion = max(len(a["token_ids"]) for r in rows for a in r["arm_outputs"])
    trainer = ReplayGRPOTrainer(
        model=model,
        reward_funcs=stored_reward_funcs(objective.names),
        args=grpo_config(
            config, job.trainer_dir, n_arms, max_completion, plan, reward_weights=objective.weights_at(0.0)
        ),
        train_dataset=Dataset.from_list([{"prompt": r["id"]} for r in rows]),
        processing_class=tokenizer,
        peft_config=peft_config,
        rollout_func=replay_func(rows, tokenizer, n_arms, components),
        callbacks=job.callbacks(),
        kl_controller=controller,
        reward_mode=config.reward,
        std_floor=config.advantage_std_floor,
        reward_plan=objective,
    )
    trainer.restore_kl(job.checkpoint)
    plot_weights(job, objective, total_steps(config.max_steps, config.epochs, plan))
    gap = None
    if behaviour == "recompute":  # before train(): a resumed run loads its checkpoint's weights only in there
        gap = recompute_behaviour_logprobs(
            trainer, rows, prompt_encoder(tokenizer), config.questions_per_minibatch * n_arms
        )
    print(
        f"ppo: behaviour log-probs {behaviour} ({why})"
        + (f"; mean |stored - recomputed| = {gap:.3g} nats per token" if gap is not None else "")
    )
    result = job.train(trainer)
    return job.finish(
        trainer,
        tokenizer,
        inputs={"rollouts": rollouts},
        identity=stage_identity,
        counts={
            "questions": rolled_out,
            "arms": n_arms,
            "zero_variance_groups": flat,
            "trained_questions": len(rows),
            "skipped_empty": empty,
            "steps": trainer.state.global_step,
        },
        metrics={
            "train_loss": job.train_loss(result, trainer),
            "final_kl_coef": controller.coef,
            "behaviour_logprob_gap": gap,
        },
        extra={
            "reference": store.relative(adapter_path) if adapter_path else "base",
            "base_mismatch_allowed": base_mismatch,
            "loss_type": config.loss_type,
            "reward": config.reward,
            "rewards": objective.identity(),
            "behaviour_logprobs": behaviour,
        },
    )


def announce_plan(plan: StepPlan, n_questions: int, questions_per_step: int) -> None:
    print(
        f"ppo: {plan.steps_per_epoch} optimizer step(s) per epoch of {questions_per_step} questions"
        + (
            f"; {plan.left_out} of the {n_questions} questions are left out of each epoch (a different random "
            f"{plan.left_out} each time)"
            if plan.left_out
            else ""
        )
    )
