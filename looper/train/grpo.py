"""GRPO training glue shared by offline and online ppo: the trainer subclasses (floored-std advantages,
adaptive KL, replay of stored completions), the behaviour log-prob recompute, and TRL's GRPOConfig
built from a PpoConfig.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from looper.config import PpoConfig
from looper.data.prompts import prompt_token_ids
from looper.policy import models
from looper.rewards.trainer_adapter import (
    RewardPlan,
    ScheduledWeights,
)
from looper.train import distributed, runner
from looper.train.grpo_math import (
    AdaptiveKL,
    StepPlan,
    floored_advantages,
)


class RegimeWGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with Looper's advantages and adaptive KL coefficient (offline and online).

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
        **runner.trainer_args(config, cuda),
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
