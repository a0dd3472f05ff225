"""Continuous batching for the HF backend (`--scheduler continuous`): a finished row's slot is refilled at once.

`HFGenerator` (static) runs each batch until its longest row ends; GSM8K answers mostly stop at a
stop string long before `max_new_tokens`, so most of a static batch's later steps compute dead
rows. Here one decode loop runs over the model's forward with a KV cache: every step feeds each
live row its last token; a row that ends (EOS, a stop string, `max_new_tokens`) leaves at once and
the next prompt is prefilled alone (no padding) and put in its slot. Rows may differ in
`Sampling` (temperature, top-p, stop strings, max tokens), so the arms of a rollout share batches.
Prompts are taken longest first, so a newcomer seldom widens the cache.

The cache keeps left padding (a 2-D attention mask and explicit position ids, as `generate` does
with left-padded batches) in per-layer buffers with spare columns: a step writes one column
where transformers' `DynamicLayer` re-copies the whole cache. Leading columns that are padding
in every row are dropped when rows leave.

Why not transformers' own `generate_batch` (paged attention): in 5.24 it runs on this CPU and gave
the same greedy tokens, but takes one generation config for all requests, has no stop strings,
no per-request seed and no untempered log-probs; see bench/bench_rollouts.py --compare-hf-cb.

Same output contract as `HFGenerator` (see `looper.generation`). Sampling: each request draws
from its own `torch.Generator` seeded from (call seed, request index), so with the same seed a
request gets the same random stream whatever batch it lands in or whichever rows finish first;
its tokens are then the same whenever its logits are, i.e. always for the same call (same prompts,
samplings, seed, batch size, dtype, machine), and up to float-level differences of batched
matmuls otherwise. Greedy ignores the seed. Processors from the model's generation config (e.g.
`suppress_tokens`) are not applied: rows are plain temperature/top-p sampling of the raw logits.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from looper.data.prompts import prompt_token_ids
from looper.errors import LooperError
from looper.generation import Completion, Sampling, cut_at_stop, expand_sampling
from looper.generation.hf import eos_token_ids

SPARE_COLUMNS = 128  # cache columns allocated ahead: one re-allocation per this many steps


class BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views of a [rows, heads, capacity, dim] buffer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.length = keys.shape[-2]
        self.kbuf, self.vbuf = self._alloc(keys, keys.shape[0], self.length + SPARE_COLUMNS)
        self.kbuf[:, :, : self.length] = keys
        self.vbuf[:, :, : self.length] = values
        self._views()

    @staticmethod
    def _alloc(like: torch.Tensor, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (rows, like.shape[1], columns, like.shape[3])
        return like.new_zeros(shape), like.new_zeros(shape)

    def _views(self) -> None:
        self.keys, self.values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]

    def _resize(self, rows: int, lead: int, spare: int) -> None:
        """New buffers with `lead` zero columns before the current ones and `spare` after them."""
        kbuf, vbuf = self._alloc(self.kbuf, rows, lead + self.length + spare)
        kept = min(rows, self.kbuf.shape[0])
        kbuf[:kept, :, lead : lead + self.length] = self.kbuf[:kept, :, : self.length]
        vbuf[:kept, :, lead : lead + self.length] = self.vbuf[:kept, :, : self.length]
        self.kbuf, self.vbuf, self.length = kbuf, vbuf, self.length + lead
        self._views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        end = self.length + key_states.shape[-2]
        if end > self.kbuf.shape[-2]:
            self._resize(self.kbuf.shape[0], 0, SPARE_COLUMNS + key_states.shape[-2])
        self.kbuf[:, :, self.length : end] = key_states
        self.vbuf[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def put(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Row `slot` := one prefilled row (1 x heads x L x dim), right-aligned, zeros before it."""
        if slot >= self.kbuf.shape[0]:
            self._resize(slot + 1, 0, self.kbuf.shape[-2] - self.length)
        lead = self.length - keys.shape[-2]
        self.kbuf[slot, :, :lead] = 0
        self.vbuf[slot, :, :lead] = 0
        self.kbuf[slot, :, lead : self.length] = keys[0]
        self.vbuf[slot, :, lead : self.length] = values[0]

    def pad_left(self, columns: int) -> None:
        self._resize(self.kbuf.shape[0], columns, self.kbuf.shape[-2] - self.length)

    def keep(self, rows: torch.Tensor | None, drop_columns: int) -> None:
        """Only `rows` (all if None: a view, no copy), without the first `drop_columns` columns."""
        if rows is not None:
            self.kbuf, self.vbuf = self.kbuf[rows], self.vbuf[rows]
        self.kbuf, self.vbuf = self.kbuf[:, :, drop_columns:], self.vbuf[:, :, drop_columns:]
        self.length -= drop_columns
        self._views()


@dataclass
class _Row:
    index: int  # position in the caller's list
    sampling: Sampling
    rng: torch.Generator | None  # None for greedy
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    position: int = 0  # position id of the next token fed


class ContinuousGenerator:
    """`Generator` with continuous batching over `model(...)` + KV cache; same contract as `HFGenerator`."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = set(eos_token_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        # Prefill needs the last position's logits only (a B x L x V tensor otherwise).
        parameters = inspect.signature(model.forward).parameters
        self.keep_last = "logits_to_keep" in parameters
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns).
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"

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
        self.device = self.model.device
        queue = deque(sorted(range(len(ids)), key=lambda i: -len(ids[i])))  # stable: ties keep input order
        out: list[Completion] = [None] * len(ids)  # type: ignore[list-item]
        self.done = self.new_tokens = 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                self._run(queue, ids, samplings, seed, logprobs, out, on_progress)
        finally:
            self.model.train(was_training)
        return out

    def _forward(self, cache: DynamicCache, **inputs: Any) -> torch.Tensor:
        inputs[self.cache_arg] = cache
        if self.keep_last:
            inputs["logits_to_keep"] = 1
        return self.model(**inputs, use_cache=True).logits[:, -1].float()

    def _run(self, queue, ids, samplings, seed, want_logprobs, out, on_progress) -> None:
        rows: list[_Row | None] = []  # one per cache slot; None = a dead slot awaiting reuse or removal
        layers: list[BufferLayer] = []
        cache = mask = None
        reported = 0
        while queue or any(rows):
            # Refill every free slot at once: prefill the next prompt alone, then copy its KV in.
            while queue and (None in rows or len(rows) < self.batch_size):
                i = queue.popleft()
                s = samplings[i]
                rng = None
                if s.temperature > 0:
                    rng = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + i)
                row = _Row(i, s, rng, position=len(ids[i]))
                prompt_cache = DynamicCache()
                logits = self._forward(prompt_cache, input_ids=torch.tensor([ids[i]], device=self.device))
                if self._step([row], logits, want_logprobs, out):
                    continue  # ended on its first token: never takes a slot
                if any(type(layer) is not DynamicLayer for layer in prompt_cache.layers):
                    raise LooperError(
                        "--scheduler continuous needs a model with a plain (non-sliding) KV cache; "
                        "use --scheduler static"
                    )
                slot = rows.index(None) if None in rows else len(rows)
                if cache is None:
                    layers = [BufferLayer(la.keys, la.values) for la in prompt_cache.layers]
                    cache = DynamicCache()
                    cache.layers = layers
                    mask = torch.ones(1, len(ids[i]), dtype=torch.long, device=self.device)
                    rows.append(row)
                    continue
                width, length = mask.shape[1], len(ids[i])
                if length > width:  # wider than the cache: pad every row on the left
                    for layer in layers:
                        layer.pad_left(length - width)
                    mask = torch.cat([mask.new_zeros(mask.shape[0], length - width), mask], 1)
                    width = length
                if slot == len(rows):
                    rows.append(row)
                    mask = torch.cat([mask, mask.new_zeros(1, width)])
                rows[slot] = row
                for layer, prompt_layer in zip(layers, prompt_cache.layers):
                    layer.put(slot, prompt_layer.keys, prompt_layer.values)
                mask[slot] = 0
                mask[slot, width - length :] = 1
            if on_progress is not None and self.done > reported:
                on_progress(self.done, self.new_tokens)
                reported = self.done
            if not any(rows):
                break
            # One decode step for every slot (a dead one is fed padding until it is reused or removed).
            last = [r.token_ids[-1] if r else self.pad_id for r in rows]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            logits = self._forward(
                cache,
                input_ids=torch.tensor(last, device=self.device)[:, None],
                attention_mask=mask,
                position_ids=torch.tensor([r.position if r else 0 for r in rows], device=self.device)[
                    :, None
                ],
            )
            live = [k for k, r in enumerate(rows) if r]
            for r in rows:
                if r:
                    r.position += 1
            finished = self._step([rows[k] for k in live], logits[live], want_logprobs, out)
            if not finished:
                continue
            for k in finished:
                rows[live[k]] = None
            # Nothing left to refill with: drop dead rows rather than compute them. Either way drop
            # the leading columns that are padding in every live row (a newcomer is right-aligned).
            keep = [k for k, r in enumerate(rows) if r]
            index = None
            if not queue and len(keep) < len(rows):
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                rows, mask = [rows[k] for k in keep], mask[keep]
            live_mask = mask[[k for k, r in enumerate(rows) if r]]
            lead = int((live_mask.sum(0) == 0).long().cumprod(0).sum()) if len(live_mask) else 0
            if lead or index is not None:
                mask = mask[:, lead:]
                for layer in layers:
                    layer.keep(index, lead)
        if on_progress is not None and self.done > reported:
            on_progress(self.done, self.new_tokens)

    def _step(self, rows: list[_Row], logits: torch.Tensor, want_logprobs: bool, out: list) -> list[int]:
        """Choose each row's next token from its logits row; the positions (in `rows`) that ended."""
        tokens = logits.argmax(-1)
        for k, r in enumerate(rows):
            if r.rng is not None:
                tokens[k] = self._sample(logits[k], r.sampling, r.rng)
        if want_logprobs:  # untempered: log_softmax of the raw logits, whatever the temperature
            taken = (logits.gather(1, tokens[:, None]).squeeze(1) - logits.logsumexp(-1)).tolist()
        finished = []
        for k, (r, token) in enumerate(zip(rows, tokens.tolist())):
            r.token_ids.append(token)
            if want_logprobs:
                r.logprobs.append(taken[k])
            completion = self._ended(r, token)
            if completion is not None:
                out[r.index] = completion
                self.done += 1
                self.new_tokens += completion.tokens
                finished.append(k)
        return finished

    @staticmethod
    def _sample(logits: torch.Tensor, s: Sampling, rng: torch.Generator) -> torch.Tensor:
        """Temperature then top-p (as transformers' TopPLogitsWarper: keep the smallest top set
        holding top_p of the mass, at least one token), drawn with the row's own generator."""
        scores = logits / s.temperature
        if s.top_p < 1:
            ordered, order = scores.sort()
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
            drop[-1] = False
            scores = scores.index_fill(0, order[drop], float("-inf"))
        return torch.multinomial(scores.softmax(-1), 1, generator=rng)[0]

    def _ended(self, r: _Row, token: int) -> Completion | None:
        """The row's Completion if `token` ended it (EOS, a stop string, max_new_tokens), else None."""
        s, ids = r.sampling, r.token_ids
        if token in self.eos_ids:
            text = self.tokenizer.decode(ids[:-1], skip_special_tokens=True)
            return Completion(text, ids, r.logprobs, "stop", eos=True)
        text = None
        if s.stop:  # checked after every token: the first hit is at the token that completed it
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = cut_at_stop(text, s.stop)
            if cut is not None:
                return Completion(cut, ids, r.logprobs, "stop")
        if len(ids) >= s.max_new_tokens:
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if text is None else text
            return Completion(text, ids, r.logprobs, "length")
        return None
