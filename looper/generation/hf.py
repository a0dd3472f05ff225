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

from looper.generation import Completion, Sampling, cut_at_stop, expand_sampling


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the generation config's (an int or a list) and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an EOS token")
    return ids


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
    ) -> list[Completion]:
        samplings = expand_sampling(prompts, sampling)
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
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
                        for i, completion in zip(chunk, self._batch([ids[i] for i in chunk], s)):
                            out[i] = completion
                            new_tokens += completion.tokens
                        done += len(chunk)
                        if on_progress is not None:
                            on_progress(done, new_tokens)
        finally:
            self.model.train(was_training)
        return out

    def _batch(self, rows: list[list[int]], s: Sampling) -> list[Completion]:
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
        device = self.model.device
        result = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=s.max_new_tokens,
            eos_token_id=self.eos_ids,
            # Finished rows are filled with EOS, so "first EOS" marks the end of every row,
            # whether it stopped on EOS or on a stop string.
            pad_token_id=self.eos_ids[0],
            repetition_penalty=1.0,
            output_logits=True,
            return_dict_in_generate=True,
            **options,
        )
        gen = result.sequences[:, width:]
        # Log-probs from the RAW logits (`result.logits`), not `result.scores`: scores have been
        # divided by the temperature and top-p masked. The RL stage needs the token's log-prob
        # under the untempered policy (temperature 1), the one it trains, as its behaviour policy.
        # One gather + logsumexp per step keeps memory at the B x T x V of the logits themselves
        # (stacking them and taking log_softmax would allocate two more such tensors).
        logprobs = torch.stack(
            [
                step.gather(1, gen[:, t, None]).squeeze(1).float() - step.float().logsumexp(-1)
                for t, step in enumerate(result.logits)
            ],
            dim=1,
        )
        is_eos = torch.isin(gen, torch.tensor(self.eos_ids, device=gen.device))
        ended = is_eos.any(1)
        # up to and including the first EOS: the one sampled (its log-prob is real, the row was still
        # running), or the filler after a stop string, which `_completion` drops with the stop string's cut
        lengths = torch.where(ended, is_eos.float().argmax(1) + 1, gen.shape[1])
        return [
            self._completion(g[:n], lp[:n], e, s.stop)
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
