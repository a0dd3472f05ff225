"""GRPO training glue shared by offline and online ppo: the trainer subclasses (floored-std advantages,
adaptive KL, replay of stored completions), the behaviour log-prob recompute, and TRL's GRPOConfig
built from a PpoConfig.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import torch
from transformers import TrainerCallback
from trl import GRPOConfig

from looper.config import PpoConfig
from looper.data.prompts import prompt_token_ids
from looper.policy import models
from looper.rewards.trainer_adapter import RewardPlan, plot_weights
from looper.train import distributed, runner
from looper.train.grpo_math import AdaptiveKL, StepPlan, floored_advantages, kl_horizon, total_steps
from looper.train.trl_internals import HookedGRPOTrainer, log_train_metric, pad


class AdaptiveKLGRPOTrainer(HookedGRPOTrainer):
    """GRPO with Looper's advantages and adaptive KL coefficient (offline and online), each completion
    trained at the temperature it was sampled with (`HookedGRPOTrainer`).

    Advantages divide by a floored std (`looper.train.grpo_math.floored_advantages`); TRL runs with
    scale_rewards="none", so its advantages are the centred rewards r - group mean.
    The KL coefficient (`self.beta`) moves after every optimizer step (`looper.train.grpo_math.AdaptiveKL`)
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

    def on_micro_batch_kl(self, kl: float) -> None:
        self.step_kls.append(kl)

    def end_of_step(self) -> None:
        if self.step_kls:
            self.beta = self.kl_controller.update(sum(self.step_kls) / len(self.step_kls))
            self.step_kls.clear()

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training log line: the coefficient in force for the next step
            logs["kl_coef"] = self.beta
        super().log(logs, start_time)

    def before_checkpoint(self, folder: Path) -> None:
        (folder / self.KL_STATE).write_bytes(orjson.dumps(self.kl_controller.state_dict()))

    def restore_state(self, checkpoint: str | None) -> None:
        """The controller's state as saved with `checkpoint` (a resumed run)."""
        path = Path(checkpoint or "") / self.KL_STATE
        if checkpoint and path.is_file():
            self.kl_controller.load_state_dict(orjson.loads(path.read_bytes()))
            self.beta = self.kl_controller.coef
        elif checkpoint:
            print(f"ppo: {checkpoint} holds no KL controller state: the coefficient restarts at {self.beta}")

    def rewrite_advantages(self, output: dict, rewards_per_func) -> None:
        device, local = output["advantages"].device, len(output["advantages"])
        # the weighted total of all processes (as TRL sums it), post-processed in the configured order
        per_func = rewards_per_func.cpu()
        total = (per_func * self.reward_weights.cpu().unsqueeze(0)).nansum(dim=1)
        for post in self.post:
            total = post(total)
        # --reward question: one shared reward per question, so centre over the batch instead of the group
        group = None if self.reward_mode == "question" else self.num_generations
        advantages = floored_advantages(total, group, self.std_floor)
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local].to(device)


class ReplayGRPOTrainer(AdaptiveKLGRPOTrainer):
    """The trainer of offline ppo: stored completions, each trained at its arm's temperature, with
    the stored (tempered) behaviour log-probs as the importance ratio's denominator."""

    replay_stored_logprobs = True
    GAP_STATE = "behaviour_gap.json"

    def __init__(self, *args, temperatures: dict[str, list[float]] | None = None, **kwargs):
        # question id -> each arm's sampling temperature, in arm order (`arm_temperatures`); None:
        # every row at the config's temperature
        self.arm_temperatures = temperatures
        self.gap_sum = self.gap_tokens = 0.0  # |stored - behaviour| over the trained tokens so far
        super().__init__(*args, **kwargs)

    def on_behaviour_logprobs(self, stored, behaviour, mask) -> None:
        totals = torch.stack([((stored - behaviour).abs() * mask).sum(), mask.sum()]).float()
        gap_sum, tokens = self.accelerator.gather(totals).view(-1, 2).sum(0).tolist()
        self.gap_sum, self.gap_tokens = self.gap_sum + gap_sum, self.gap_tokens + tokens

    def behaviour_gap(self) -> float:
        """Mean |stored - recomputed| log-prob per token of the completions trained (resumes included)."""
        return self.gap_sum / max(self.gap_tokens, 1.0)

    def before_checkpoint(self, folder: Path) -> None:
        super().before_checkpoint(folder)
        if self.behaviour_from_reference:
            (folder / self.GAP_STATE).write_bytes(orjson.dumps([self.gap_sum, self.gap_tokens]))

    def restore_state(self, checkpoint: str | None) -> None:
        super().restore_state(checkpoint)
        path = Path(checkpoint or "") / self.GAP_STATE
        if checkpoint and path.is_file():
            self.gap_sum, self.gap_tokens = orjson.loads(path.read_bytes())

    def row_temperatures(self, inputs: list[dict]) -> list[float]:
        if self.arm_temperatures is None:
            return super().row_temperatures(inputs)
        # TRL repeats each question's prompt (its id) once per arm, in arm order (see replay_func)
        ids = [x["prompt"] for x in inputs][:: self.num_generations]
        return [t for question in ids for t in self.arm_temperatures[question]]


class ScheduledWeights(TrainerCallback):
    """Sets TRL's reward weights from the schedule before each optimizer step (progress = step / max_steps)."""

    def __init__(self, trainer, plan: RewardPlan):
        self.trainer, self.plan = trainer, plan

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        progress = state.global_step / max(state.max_steps, 1)
        weights = self.plan.weights_at(progress)
        self.trainer.reward_weights = torch.tensor(weights, dtype=torch.float32)
        for name, weight in zip(self.plan.names, weights):  # logged with the step as weights/<name>
            log_train_metric(self.trainer, f"weights/{name}", weight)


class KLStep(TrainerCallback):
    """Moves the trainer's KL coefficient after each optimizer step."""

    def __init__(self, trainer: AdaptiveKLGRPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.end_of_step()


def arm_temperatures(rows: list[dict]) -> dict[str, list[float]]:
    """Question id -> the temperature each of its arms sampled at (1 for a greedy arm: the stored
    log-probs of a greedy row are taken at 1, `looper.generation.behaviour_temperature`)."""
    return {
        r["id"]: [a["temperature"] if a["temperature"] > 0 else 1.0 for a in r["arm_outputs"]] for r in rows
    }


def recompute_behaviour_logprobs(
    trainer: HookedGRPOTrainer, rows: list[dict], encode, batch_size: int
) -> float:
    """Replace each stored completion's log-probs by the training model's at the arm's temperature
    (before any update, dropout off, the forward the loss uses); returns the mean |stored -
    recomputed| per token. Scores every row, trained or not: ppo uses it only where the reference pass
    cannot stand in (`HookedGRPOTrainer.reference_is_initial_policy`)."""
    arms, pad_id = [a for r in rows for a in r["arm_outputs"]], trainer.processing_class.pad_token_id
    temps = [t for ts in arm_temperatures(rows).values() for t in ts]
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
            logps = trainer.token_logprobs(
                input_ids, mask, max(map(len, completions)), temps[start : start + batch_size]
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
        **runner.trainer_args(config, cuda),
        output_dir=str(output_dir),
        per_device_train_batch_size=questions * n_arms,  # completions, all arms of each question
        gradient_accumulation_steps=micro_batches,
        num_generations=n_arms,
        max_completion_length=max_completion,
        # sampling temperature (online); offline every row is trained at its arm's own (ReplayGRPOTrainer)
        temperature=temperature,
        learning_rate=config.learning_rate,
        max_grad_norm=config.max_grad_norm,
        beta=config.kl_coef,
        epsilon=config.clip_epsilon,
        loss_type=config.loss_type,
        reward_weights=reward_weights,
        scale_rewards="none",  # centred only: AdaptiveKLGRPOTrainer divides by the floored group std
        disable_dropout=True,  # dropout in the forwards that form the ratio and the KL would read as policy change
    )


def build_trainer(
    trainer_class: type,
    config: PpoConfig,
    job,
    plan: StepPlan,
    objective: RewardPlan,
    *,
    generations: int,
    max_completion: int,
    temperature: float = 1.0,
    **trainer_kwargs,
):
    """The GRPO trainer of offline and online ppo alike: TRL's config from `config`, the adaptive KL
    controller over the run's steps (restored from a resumed checkpoint), the reward weights'
    schedule plotted into the artifact. `trainer_kwargs`: model, reward_funcs, train_dataset,
    processing_class, peft_config and the trainer class's own (rollout_func, temperatures, ...)."""
    steps = total_steps(config.max_steps, config.epochs, plan)
    controller = AdaptiveKL(config.kl_coef, config.kl_target, kl_horizon(config.kl_horizon, steps))
    trainer = trainer_class(
        args=grpo_config(
            config,
            job.trainer_dir,
            generations,
            max_completion,
            plan,
            temperature=temperature,
            reward_weights=objective.weights_at(0.0),
        ),
        callbacks=job.callbacks(),
        kl_controller=controller,
        std_floor=config.advantage_std_floor,
        reward_plan=objective,
        **trainer_kwargs,
    )
    trainer.restore_state(job.checkpoint)
    plot_weights(job, objective, steps)
    return trainer


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
