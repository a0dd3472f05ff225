"""Batched generation with vLLM (GPU only), optionally through a LoRA adapter.

Targets vLLM >= 0.10.2 with the V1 engine. Checked against vLLM's source/docs but NOT run
here (no GPU, vLLM not installed); the assumptions, in order of risk:

* ``LLM(..., logprobs_mode="raw_logprobs")``: sample log-probs are ``log_softmax`` of the
  raw logits, before temperature / top-p (V1's default; set explicitly since older V1
  releases had no such option and the default might change);
* ``SamplingParams(logprobs=0)`` returns the sampled token's log-prob (and no others) in
  ``output.logprobs[i][token_id].logprob``;
* when a completion ends on EOS or a stop token id, that token is the last of
  ``output.token_ids`` with ``stop_reason`` None (EOS) or the id; a stop string gives
  ``stop_reason`` = the string, ``text`` cut before it, and token_ids up to the token that
  completed it. We drop the ending EOS / stop token to match the `hf` backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from looper.generation import Completion, Sampling, expand_sampling


class VLLMGenerator:
    """`Generator` over `vllm.LLM.generate`; see `looper.generation` for the output conventions."""

    def __init__(
        self,
        model_path: str,
        adapter_path: str | None = None,
        *,
        max_lora_rank: int = 64,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        seed: int = 0,
        dtype: str = "auto",
    ) -> None:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.llm = LLM(
            model=model_path,
            enable_lora=adapter_path is not None,
            max_lora_rank=max_lora_rank,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            dtype=dtype,
            logprobs_mode="raw_logprobs",
        )
        # One adapter for the engine's life: vLLM caches adapters by id, so a new adapter
        # needs a new generator (or a new id).
        self.lora = LoRARequest("adapter", 1, adapter_path) if adapter_path is not None else None
        self.tokenizer = self.llm.get_tokenizer()
        self.eos_ids = {self.tokenizer.eos_token_id}
        try:  # the model's generation config may list more EOS ids (vLLM stops on them too)
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
            self.eos_ids |= {eos} if isinstance(eos, int) else set(eos or ())
        except OSError:
            pass

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
        from vllm import SamplingParams

        samplings = expand_sampling(prompts, sampling)
        if not samplings:
            return []
        # Tokenize here without special tokens (the chat template already put in BOS), as the
        # hf backend does; vLLM would add them to a text prompt.
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        params = [
            SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_new_tokens,
                stop=list(s.stop) or None,
                # A seed per request: reproducible whatever vLLM's scheduling, and repeated
                # prompts with equal sampling still get different samples.
                seed=seed * 1_000_003 + i,
                logprobs=0 if logprobs else None,  # None: vLLM returns no log-probs (eval)
            )
            for i, s in enumerate(samplings)
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in ids], params, lora_request=self.lora, use_tqdm=False
        )
        completions = [self._completion(o.outputs[0]) for o in outputs]  # vLLM keeps input order
        if on_progress is not None:
            on_progress(len(completions), sum(c.tokens for c in completions))
        return completions

    def _completion(self, out: Any) -> Completion:
        ids = list(out.token_ids)
        logprobs = [step[t].logprob for step, t in zip(out.logprobs or [], ids)]
        finish = "length" if out.finish_reason == "length" else "stop"
        ended_on_token = finish == "stop" and not isinstance(out.stop_reason, str)
        if ended_on_token and ids and (ids[-1] in self.eos_ids or ids[-1] == out.stop_reason):
            ids, logprobs = ids[:-1], logprobs[:-1]
        return Completion(out.text, ids, logprobs, finish)
