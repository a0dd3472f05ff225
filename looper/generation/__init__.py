"""Batched text generation: one small interface over Hugging Face `generate` and vLLM.

The rollouts stage (many questions x several temperature "arms") and the eval stage (greedy
or sampled) both call ``make_generator(...).generate(prompts, sampling)``; this package is
the only place in Looper that knows about batching, padding, vLLM or LoRA loading.

Conventions shared by both backends (the tests pin them for `hf`):

* prompts are fully rendered chat-template strings; they are tokenized with
  ``add_special_tokens=False`` because the template already put in any BOS;
* ``Completion.token_ids`` are the generated tokens **including** the EOS token that ended
  the completion (then ``eos`` is True), without any padding after it, so replaying them
  trains the model's stopping too; a first-token EOS gives ``token_ids == [eos]``, never an
  empty list. When a stop string ended it, they run up to and including the token that
  completed the stop string (no EOS, ``eos`` False), while ``text`` is cut just before the
  stop string (the same split vLLM makes);
* ``Completion.tokens`` counts the generated tokens **without** that EOS (``len(token_ids) -
  eos``): the length Regime W's s_path and length penalty score, and the one reported;
* ``Completion.logprobs[i]`` is ``log_softmax(logits / T)[token_ids[i]]`` (the EOS's
  included), T the temperature the token was sampled at (``behaviour_temperature``: 1 for greedy
  rows), before top-p: the tempered policy the token was drawn from. The RL stage uses these as the
  behaviour policy's log-probs and trains each completion at the same temperature, so its
  importance ratios compare like with like (TRL's convention: sample at T, train log softmax(z / T)).
  They are taken step by step (never all B x T x V logits kept); a caller that needs none
  (eval) passes ``logprobs=False`` and gets an empty list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from looper.errors import LooperError

__all__ = [
    "Sampling",
    "Completion",
    "Generator",
    "default_batch_size",
    "expand_sampling",
    "cut_at_stop",
]

BACKENDS = ("hf", "vllm")
SCHEDULERS = ("continuous", "static")  # hf backend: refill finished rows at once | whole batches
# The hf backend's batch when none is set. On a CPU a decode step is memory-bound (every weight and
# the rows' KV cache read once per step): the continuous scheduler's step at 64 rows costs ~2-2.5x
# its step at 16 (bench/profile_generation.py); beyond ~64 the KV cache reads dominate. Static
# batches (a batch waits for its longest row) and GPUs (memory: `looper plan`) keep 16.
CPU_CONTINUOUS_BATCH, DEFAULT_BATCH = 64, 16
VLLM_HINT = "the vllm backend needs vLLM: pip install 'looper[vllm]' (GPU only), or use --backend hf"


@dataclass(frozen=True)
class Sampling:
    """How to decode one prompt. Hashable: requests with equal `Sampling` share batches."""

    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()  # the text is cut before the first one; finish_reason "stop"

    def __post_init__(self) -> None:
        # Accept a list or a single string for `stop` but store a tuple, so Sampling stays hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        if self.temperature < 0:
            raise LooperError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LooperError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise LooperError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def behaviour_temperature(sampling: Sampling) -> float:
    """The temperature a row's stored log-probs are taken at: its sampling temperature, or 1 for a
    greedy row (its tokens were not drawn from any tempered distribution; 1 keeps them finite)."""
    return sampling.temperature if sampling.temperature > 0 else 1.0


@dataclass
class Completion:
    """One generated continuation. See the module docstring for what the token lists hold."""

    text: str  # decoded generated text, special tokens skipped, cut before a stop string
    token_ids: list[int]  # generated tokens, the EOS that ended the completion included; no padding
    logprobs: list[float]  # tempered log-prob of each token in token_ids (same length; [] if not asked)
    # "stop" (EOS or stop string) | "length" (hit max_new_tokens); vLLM may also end a request
    # as "abort" or "error", recorded as such
    finish_reason: str
    eos: bool = False  # token_ids[-1] is the EOS that ended the completion

    @property
    def tokens(self) -> int:
        """Generated tokens, the ending EOS not counted."""
        return len(self.token_ids) - self.eos


@runtime_checkable
class Generator(Protocol):
    def generate(
        self,
        prompts: Sequence[str],
        sampling: Sequence[Sampling] | Sampling,
        *,
        seed: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
        logprobs: bool = True,
    ) -> list[Completion]:
        """One completion per prompt, in input order. `sampling` is one for all or one per prompt.

        ``logprobs=False`` (eval) computes no log-probs: ``Completion.logprobs`` is empty.

        The same call with the same `seed` returns the same completions.
        ``on_progress(completions_done, new_tokens)`` gets running totals for this call after
        each batch (the vLLM backend runs one batch, so it is called once at the end).
        """
        ...


def expand_sampling(prompts: Sequence[str], sampling: Sequence[Sampling] | Sampling) -> list[Sampling]:
    """One `Sampling` per prompt (a single one is shared by all)."""
    if isinstance(sampling, Sampling):
        return [sampling] * len(prompts)
    samplings = list(sampling)
    if len(samplings) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(samplings)} Sampling values")
    return samplings


def cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """`text` cut before the earliest occurrence of any stop string, or None if none occurs."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else None


def default_batch_size(scheduler: str, device: Any) -> int:
    """The hf backend's batch when none is set (see CPU_CONTINUOUS_BATCH); `device` a torch device or its name."""
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    return CPU_CONTINUOUS_BATCH if scheduler == "continuous" and on_cpu else DEFAULT_BATCH
