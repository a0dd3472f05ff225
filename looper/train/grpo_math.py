"""Pieces of the ppo stage (offline and `--online`) that are plain arithmetic, kept out of the stage
module so it stays readable: the step plan, group advantages, the adaptive KL controller.
"""

from __future__ import annotations

from dataclasses import dataclass

from looper.errors import LooperError


@dataclass(frozen=True)
class StepPlan:
    """How the questions of one epoch become optimizer steps."""

    micro_batches: int  # gradient-accumulation steps: questions_per_step // questions_per_minibatch
    steps_per_epoch: int
    left_out: int  # questions beyond the last whole step: TRL's sampler drops a random such set each epoch


def step_plan(n_questions: int, questions_per_step: int, questions_per_minibatch: int) -> StepPlan:
    """The step plan, or a LooperError where it would not train as asked (never a silent 0-step run)."""
    if questions_per_step < 1 or questions_per_minibatch < 1:
        raise LooperError("--questions-per-step and --questions-per-minibatch must be 1 or more")
    if questions_per_step % questions_per_minibatch:
        raise LooperError(
            f"--questions-per-step {questions_per_step} is not a whole number of "
            f"--questions-per-minibatch {questions_per_minibatch}: make it a multiple"
        )
    if n_questions < questions_per_step:
        raise LooperError(
            f"the rollouts hold {n_questions} question(s), fewer than --questions-per-step "
            f"{questions_per_step}: no whole step; lower --questions-per-step or roll out more"
        )
    return StepPlan(
        questions_per_step // questions_per_minibatch,
        n_questions // questions_per_step,
        n_questions % questions_per_step,
    )


def floored_advantages(rewards, group_size: int | None, std_floor: float):
    """(r - mean) / max(std, std_floor), over groups of `group_size` consecutive rewards (None: the whole batch).

    TRL divides by std + 1e-4: eight correct, agreeing arms whose rewards differ only by a
    length penalty of a few thousandths would get advantages of about +-1.4, as strong as a
    right-versus-wrong group. The floor keeps differences smaller than it small. Std is the
    unbiased one, as TRL's."""
    import torch

    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    grouped = rewards.view(-1, group_size if group_size is not None else len(rewards))
    if grouped.shape[1] < 2:
        return torch.zeros_like(rewards)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / grouped.std(dim=1, keepdim=True).clamp(min=std_floor)).view(-1)


class AdaptiveKL:
    """Adaptive KL coefficient, moved once per optimizer step towards a target KL in nats per token.

    The KL is TRL's `kl` metric: the mean over completion tokens of the k3 estimate of
    KL(policy || reference). Each step, with e = clip(ln(KL / target), -1, 1):
    coef *= exp(e / horizon). A proportional controller in log space (Ziegler et al. 2019
    move coef by clip(KL / target - 1, +-0.2) x samples / horizon, which over a run of tens of
    steps barely moves it): at most a factor e per `horizon` steps, and an error of a factor
    2 shrinks by about 1 - 1/horizon per step when KL follows the coefficient. target 0 or
    coef 0: fixed coefficient.
    """

    MIN_COEF, MAX_COEF = 1e-6, 100.0

    def __init__(self, coef: float, target: float, horizon: float):
        if horizon <= 0:
            raise LooperError(f"--kl-horizon {horizon}: must be > 0 steps (or 0 in the config for auto)")
        self.coef, self.target, self.horizon, self.steps = coef, target, horizon, 0

    @property
    def adaptive(self) -> bool:
        return self.target > 0 and self.coef > 0

    def update(self, kl: float) -> float:
        """The coefficient for the next step, given the mean per-token KL of the step just taken."""
        import math

        if self.adaptive and math.isfinite(kl):
            error = min(max(math.log(kl / self.target), -1.0), 1.0) if kl > 0 else -1.0
            self.coef = min(max(self.coef * math.exp(error / self.horizon), self.MIN_COEF), self.MAX_COEF)
        self.steps += 1
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.steps = float(state["coef"]), int(state["steps"])


def kl_horizon(configured: int, total_steps: int) -> float:
    """The controller's horizon in optimizer steps: as configured, or (0) a tenth of the run, 2 to 10 steps."""
    return configured if configured > 0 else min(10.0, max(2.0, total_steps / 10))


def total_steps(max_steps: int | None, epochs: float, plan: StepPlan) -> int:
    """Optimizer steps the run will take (as transformers counts them)."""
    import math

    return max_steps if max_steps is not None else max(1, math.ceil(epochs * plan.steps_per_epoch))


BEHAVIOUR_CHOICES = ("stored", "recompute", "auto")


# Rollouts schema from which stored log-probs are tempered (at each arm's temperature): older ones
# stored untempered log-probs, which a tempered ratio must never be taken against.
TEMPERED_SCHEMA = 4


def behaviour_logprobs_source(
    choice: str, generated_by: dict | None, training: dict, schema_version: int = TEMPERED_SCHEMA
) -> tuple[str, str]:
    """("stored" | "recompute", why): where the ratio's denominator comes from.

    `auto` recomputes when the weights that sampled the rollouts (`generated_by` in their
    manifest: backend, quantisation, dtype) are not the ones ppo trains (`training`: hf,
    its quant and dtype): e.g. vLLM bf16 rollouts for an NF4 QLoRA policy. Without a record
    (older rollouts) it recomputes too: the cost is one forward pass over the rollouts. Rollouts
    older than schema 4 stored untempered log-probs: always recomputed (at the arm's temperature)."""
    if choice not in BEHAVIOUR_CHOICES:
        raise LooperError(f"--behaviour-logprobs {choice}: choose {', '.join(BEHAVIOUR_CHOICES)}")
    if schema_version < TEMPERED_SCHEMA:
        if choice == "stored":
            raise LooperError(
                f"--behaviour-logprobs stored: these rollouts (schema {schema_version}) stored untempered "
                "log-probs, and ppo trains each completion at its arm's temperature; use recompute or auto, "
                "or rerun `looper rollouts`"
            )
        return "recompute", f"rollouts schema {schema_version} stored untempered log-probs"
    if choice != "auto":
        return choice, f"--behaviour-logprobs {choice}"
    if not generated_by:
        return "recompute", "the rollouts do not record the weights that sampled them"
    differ = [
        f"{key} {generated_by.get(key)} vs {training[key]}"
        for key in ("backend", "quant", "dtype")
        if generated_by.get(key) != training[key]
    ]
    if differ:
        return "recompute", "rollouts sampled with other weights than trained: " + ", ".join(differ)
    return "stored", "rollouts sampled with the weights trained (backend, quant, dtype)"


def with_tokens(rows: list[dict]) -> tuple[list[dict], int]:
    """The questions whose every arm has at least one token, and how many were skipped.

    A group must keep all its arms, so a question with an empty completion (a backend that
    stored none for a first-token EOS) is left out whole; TRL cannot train a 0-token completion."""
    kept = [r for r in rows if all(len(a["token_ids"]) for a in r["arm_outputs"])]
    if len(kept) < len(rows):
        print(f"ppo: {len(rows) - len(kept)} question(s) skipped: an arm with no stored token")
    if not kept:
        raise LooperError(
            "every question of the rollouts has an arm with no stored token: rerun `looper rollouts`"
        )
    return kept, len(rows) - len(kept)


def skip_flat(rows: list[dict], flat_ids: set[str], reward: str) -> list[dict]:
    """--skip-flat-groups: the rows whose arms' rewards differ, or a one-line error when none do."""
    if reward == "question":
        raise LooperError(
            "--skip-flat-groups needs per-arm rewards: with --reward question every group is flat; "
            "use --reward arm or correctness"
        )
    kept = [r for r in rows if r["id"] not in flat_ids]
    if not kept:
        raise LooperError(
            f"--skip-flat-groups: all {len(rows)} question groups have zero reward variance, nothing "
            "to learn from; roll out more questions or arms, or drop --skip-flat-groups"
        )
    print(f"ppo: --skip-flat-groups: training on the {len(kept)} question group(s) with reward variance")
    return kept


def tempered_logprobs(logits, token_ids, temperatures):
    """log_softmax(logits / T)[token] per position, T per row: the log-probs of the tempered
    policy each row was sampled from (logits B x K x V, token_ids B x K, temperatures B).

    Its gradient in the logits is (onehot(token) - softmax(logits / T)) / T: a low-temperature
    sample moves the logits of the distribution it was drawn from (tests/test_grpo_math.py)."""
    import torch

    scaled = logits.float() / temperatures.to(logits.device, torch.float32)[:, None, None]
    return scaled.log_softmax(-1).gather(-1, token_ids[..., None]).squeeze(-1)
