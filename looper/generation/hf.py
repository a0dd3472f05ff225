"""Batched generation with a Hugging Face causal LM (CPU or one GPU; PEFT models too).

Requests are grouped by identical `Sampling` (one `model.generate` call takes one set of
decoding options), each group is sorted longest prompt first (similar lengths share a batch,
so little padding; an out-of-memory batch shows up first), cut into `batch_size` batches,
left-padded, generated, and put back in input order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from looper.data.prompts import prompt_token_ids
from looper.generation import Completion, Sampling, behaviour_temperature, cut_at_stop, expand_sampling


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the generation config's (an int or a list) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an EOS token")
    return ids


class SampledLogprobs:
    """A LogitsProcessor recording, step by step, the log-prob of each row's sampled token under the
    logits it is handed, at the batch's temperature: log_softmax(logits / T)[token].

    `generate` applies the processors it builds from the generation config first (none with
    the options `_batch` passes, unless the model's own generation config asks for some, e.g.
    `suppress_tokens`: then the policy sampled from is that processed one, and so are these),
    then the ones passed as `logits_processor` (this one), then the sampling warpers
    (temperature, top-p): the logits seen here are the untempered ones, divided by T here. The
    token drawn at step t is only known at step t + 1 (the last column of `input_ids`), so one
    step's B x V log-probs are held until then, never the B x T x V of all steps; `finish` takes
    the last step's from the returned sequences."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # B x V log-probs of the last step
        self.taken: list[torch.Tensor] = []  # one B vector per generated token

    def _take(self, tokens: torch.Tensor) -> None:
        self.taken.append(self.previous.gather(1, tokens[:, None].to(self.previous.device)).squeeze(1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self._take(input_ids[:, -1])
        logits = scores.float() / self.temperature
        self.previous = logits - logits.logsumexp(-1, keepdim=True)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """B x T log-probs of `generated` (the new tokens `generate` returned)."""
        if self.previous is not None and len(self.taken) < generated.shape[1]:
            self._take(generated[:, len(self.taken)])
        self.previous = None
        if len(self.taken) != generated.shape[1]:
            raise RuntimeError(
                f"recorded {len(self.taken)} log-probs for {generated.shape[1]} generated tokens"
            )
        return torch.stack(self.taken, dim=1).cpu() if self.taken else torch.zeros(generated.shape)


class HFGenerator:
    """`Generator` over `model.generate`; see `looper.generation` for the output conventions."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

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
        ids = [prompt_token_ids(self.tokenizer, p) for p in prompts]  # one BOS: the template's
        groups: dict[Sampling, list[int]] = {}
        for i, s in enumerate(samplings):
            groups.setdefault(s, []).append(i)
        out: list[Completion] = [None] * len(ids)  # type: ignore[list-item]
        done = new_tokens = batch_index = 0
        device = self.model.device
        was_training = self.model.training
        self.model.eval()
        # fork_rng: seeding per batch must not change the caller's global RNG stream.
        try:
            with (
                torch.inference_mode(),
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            ):
                for s, group in groups.items():
                    group.sort(key=lambda i: -len(ids[i]))  # stable: ties keep input order
                    for start in range(0, len(group), self.batch_size):
                        chunk = group[start : start + self.batch_size]
                        # Seed from (call seed, batch number): the same call gives the same completions.
                        torch.manual_seed(seed * 1_000_003 + batch_index)
                        batch_index += 1
                        for i, completion in zip(chunk, self._batch([ids[i] for i in chunk], s, logprobs)):
                            out[i] = completion
                            new_tokens += completion.tokens
                        done += len(chunk)
                        if on_progress is not None:
                            on_progress(done, new_tokens)
        finally:
            self.model.train(was_training)
        return out

    def _batch(self, rows: list[list[int]], s: Sampling, want_logprobs: bool = True) -> list[Completion]:
        """One `model.generate` call on left-padded rows (padding built here, not by the tokenizer,
        so its `padding_side` is never touched)."""
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, row in enumerate(rows):
            input_ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[r, width - len(row) :] = 1
        options: dict[str, Any] = {"do_sample": False}
        if s.temperature > 0:  # top_k=0: no top-k cut the model's generation config might carry
            options = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0}
        if s.stop:
            options |= {"stop_strings": list(s.stop), "tokenizer": self.tokenizer}
        recorder = SampledLogprobs(behaviour_temperature(s)) if want_logprobs else None
        device = self.model.device
        gen = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=s.max_new_tokens,
            eos_token_id=self.eos_ids,
            # Finished rows are filled with EOS, so "first EOS" marks the end of every row,
            # whether it stopped on EOS or on a stop string.
            pad_token_id=self.eos_ids[0],
            repetition_penalty=1.0,
            logits_processor=[recorder] if recorder else None,
            **options,
        )[:, width:]
        # No B x T x V logits are kept (`output_logits`): the recorder keeps one step's log-probs
        # and the sampled tokens' values; without log-probs (eval) nothing is recorded at all.
        logprobs = recorder.finish(gen) if recorder else torch.zeros(gen.shape)
        is_eos = torch.isin(gen, torch.tensor(self.eos_ids, device=gen.device))
        ended = is_eos.any(1)
        # up to and including the first EOS: the one sampled (its log-prob is real, the row was still
        # running), or the filler after a stop string, which `_completion` drops with the stop string's cut
        lengths = torch.where(ended, is_eos.float().argmax(1) + 1, gen.shape[1])
        return [
            self._completion(g[:n], lp[:n] if want_logprobs else [], e, s.stop)
            for g, lp, n, e in zip(gen.tolist(), logprobs.tolist(), lengths.tolist(), ended.tolist())
        ]

    def _completion(
        self, ids: list[int], logprobs: list[float], ended: bool, stop: tuple[str, ...]
    ) -> Completion:
        """`ids` end with the EOS (or post-stop-string filler) that ended the row when `ended`."""
        text = self.tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
        cut = cut_at_stop(text, stop) if stop else None
        if cut is None:  # ended on EOS (kept, with its log-prob) or on max_new_tokens
            return Completion(text, ids, logprobs, "stop" if ended else "length", eos=ended)
        if ended:
            ids, logprobs = ids[:-1], logprobs[:-1]
        # Keep tokens up to and including the one that completed the stop string: the smallest
        # prefix whose text contains it (binary search; `generate` already stopped there, so
        # this normally keeps every token, but it holds even if decoding joins text differently).
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if cut_at_stop(self.tokenizer.decode(ids[:mid], skip_special_tokens=True), stop) is None:
                lo = mid + 1
            else:
                hi = mid
        return Completion(cut, ids[:lo], logprobs[:lo], "stop")
