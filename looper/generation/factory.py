"""`make_generator`: the one place that picks and builds a backend (hf static, hf continuous, vLLM).

Kept out of the package's `__init__` so the backends can import the shared types there without an
import circle; vLLM is imported only here, only when chosen.
"""

from __future__ import annotations

from typing import Any

from looper.errors import LooperError
from looper.generation import BACKENDS, SCHEDULERS, VLLM_HINT, Generator, default_batch_size


def make_generator(
    backend: str,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_path: str | None = None,
    adapter_path: str | None = None,
    batch_size: int | None = None,
    scheduler: str = "static",
    **kwargs: Any,
) -> Generator:
    """A generator for `backend`.

    'hf': ``HFGenerator(model, tokenizer, batch_size)`` on an already loaded model (a PEFT
    model included), or with ``scheduler="continuous"`` ``ContinuousGenerator`` (same contract,
    a finished row's slot refilled at once: `looper.generation.continuous`); `batch_size` None
    is `default_batch_size` for the model's device; `model_path`, `adapter_path` and `kwargs`
    are not used.
    'vllm': ``VLLMGenerator(model_path, adapter_path, **kwargs)`` (kwargs: adapter_rank and
    the engine settings of `looper.generation.vllm.engine_kwargs`); `model`, `tokenizer`,
    `batch_size` are not used, vLLM batches by itself. vLLM is imported only here, only when chosen.
    """
    if backend == "hf":
        if model is None or tokenizer is None:
            raise ValueError("the hf backend needs model= and tokenizer=")
        if scheduler not in SCHEDULERS:
            raise LooperError(f"unknown --scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if batch_size is None:
            batch_size = default_batch_size(scheduler, model.device)
        if scheduler == "continuous":
            from looper.generation.continuous import ContinuousGenerator

            return ContinuousGenerator(model, tokenizer, batch_size=batch_size)
        from looper.generation.hf import HFGenerator

        return HFGenerator(model, tokenizer, batch_size=batch_size)
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise LooperError(VLLM_HINT) from exc
        if model_path is None:
            raise ValueError("the vllm backend needs model_path=")
        from looper.generation.vllm import VLLMGenerator

        return VLLMGenerator(str(model_path), None if adapter_path is None else str(adapter_path), **kwargs)
    raise LooperError(f"unknown generation backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
