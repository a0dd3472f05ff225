"""Continuous batching for the HF backend (`--scheduler continuous`): a finished row's slot is refilled at once.

`HFGenerator` (static) runs each batch until its longest row ends; GSM8K answers mostly stop at a
stop string long before `max_new_tokens`, so most of a static batch's later steps compute dead
rows. Here one decode loop runs over the model's forward with a KV cache: every step feeds each
live row its last token; a row that ends (EOS, a stop string, `max_new_tokens`) leaves at once and
its slot is refilled from the queue. Newcomers are prefilled together (one left-padded forward for
all free slots, the last position's logits only) and their keys/values copied into their slots.
Rows may differ in `Sampling` (temperature, top-p, stop strings, max tokens), so the arms of a
rollout share batches. Prompts are taken longest first, so a newcomer seldom widens the cache.

Where the time goes (bench/profile_generation.py, SmolLM2-135M, float32, 2-core CPU): a decode
step reads every weight once whatever the batch, so it is memory-bound and costs little more for
64 rows than for 16; prefill is compute-bound. Hence: slots are allocated once (no per-newcomer
re-allocation of the cache), rows are sampled in one batched pass (one uniform per row from its
own generator, inverse CDF; `torch.multinomial` per row drew 49k exponentials each), and dead
rows at the tail are dropped only when a quarter of the slots are dead (each drop copies the cache).

The cache keeps left padding (a 2-D attention mask and explicit position ids, as `generate` does
with left-padded batches) in per-layer buffers with spare columns: a step writes one column
where transformers' `DynamicLayer` re-copies the whole cache. Leading columns that are padding
in every live row are dropped when rows leave.

Why not transformers' own `generate_batch` (paged attention): in 5.24 it runs on this CPU and gave
the same greedy tokens, but takes one generation config for all requests, has no stop strings,
no per-request seed and no log-probs of their own; see bench/bench_rollouts.py --compare-hf-cb.

Same output contract as `HFGenerator` (see `looper.generation`). Sampling: each request draws
one uniform number per token from its own `torch.Generator` seeded from (call seed, request
index) and takes the token where it falls in the cumulative distribution (temperature, then
top-p as transformers' `TopPLogitsWarper`). So with the same seed a request gets the same random
stream whatever batch it lands in or whichever rows finish first; its tokens are then the same
whenever its logits are, i.e. always for the same call (same prompts, samplings, seed, batch
size, dtype, machine), and up to float-level differences of batched matmuls otherwise. Greedy
ignores the seed. Processors from the model's generation config (e.g. `suppress_tokens`) are not
applied: rows are plain temperature/top-p sampling of the raw logits.
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
from looper.generation import Completion, Sampling, behaviour_temperature, cut_at_stop, expand_sampling
from looper.generation.hf import eos_token_ids

SPARE_COLUMNS = 128  # cache columns allocated ahead: one re-allocation per this many steps
PREFILL_TOKENS = 8192  # most (padded) prompt tokens prefilled in one forward: bounds its activations


class BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views of a [rows, heads, capacity, dim] buffer."""

    def __init__(self, like: torch.Tensor, rows: int, length: int) -> None:
        """Zeroed buffers of `rows` slots shaped like `like` (any x heads x any x dim), `length` columns in use."""
        super().__init__()
        self.device, self.is_initialized = like.device, True
        self.length = length
        self.kbuf, self.vbuf = self._alloc(like, rows, length + SPARE_COLUMNS)
        self._views()

    @staticmethod
    def _alloc(like: torch.Tensor, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (rows, like.shape[1], columns, like.shape[3])
        return like.new_zeros(shape), like.new_zeros(shape)

    def _views(self) -> None:
        self.keys, self.values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]

    def _resize(self, lead: int, spare: int) -> None:
        """New buffers with `lead` zero columns before the current ones and `spare` after them."""
        kbuf, vbuf = self._alloc(self.kbuf, self.kbuf.shape[0], lead + self.length + spare)
        kbuf[:, :, lead : lead + self.length] = self.keys
        vbuf[:, :, lead : lead + self.length] = self.values
        self.kbuf, self.vbuf, self.length = kbuf, vbuf, self.length + lead
        self._views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        end = self.length + key_states.shape[-2]
        if end > self.kbuf.shape[-2]:
            self._resize(0, SPARE_COLUMNS + key_states.shape[-2])
        self.kbuf[:, :, self.length : end] = key_states
        self.vbuf[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def put(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows `slots` := prefilled rows (k x heads x L x dim, left-padded), right-aligned, zeros before."""
        lead = self.length - keys.shape[-2]
        self.kbuf[slots, :, :lead] = 0
        self.vbuf[slots, :, :lead] = 0
        self.kbuf[slots, :, lead : self.length] = keys
        self.vbuf[slots, :, lead : self.length] = values

    def pad_left(self, columns: int) -> None:
        self._resize(columns, self.kbuf.shape[-2] - self.length)

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

    def _prefill(
        self, chunk: list[int], ids: list[list[int]]
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One forward over the `chunk` prompts, left-padded: their cache, last logits and mask."""
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, i in enumerate(chunk):
            input_ids[r, width - len(ids[i]) :] = torch.tensor(ids[i], dtype=torch.long)
            mask[r, width - len(ids[i]) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        # Position ids count real tokens only, as `generate` makes them for a left-padded batch.
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = self._forward(cache, input_ids=input_ids, attention_mask=mask, position_ids=positions)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise LooperError(
                "--scheduler continuous needs a model with a plain (non-sliding) KV cache; use --scheduler static"
            )
        return cache, logits, mask

    @staticmethod
    def _take(queue: deque, ids: list[list[int]], free: int) -> list[int]:
        """Up to `free` next prompts whose padded prefill stays within PREFILL_TOKENS (at least one)."""
        chunk = [queue.popleft()]
        width = len(ids[chunk[0]])  # the queue is longest first: the first sets the padded width
        while queue and len(chunk) < free and (len(chunk) + 1) * width <= PREFILL_TOKENS:
            chunk.append(queue.popleft())
        return chunk

    def _run(self, queue, ids, samplings, seed, want_logprobs, out, on_progress) -> None:
        # One slot per row, allocated once; None = a dead slot awaiting reuse (fed padding meanwhile).
        rows: list[_Row | None] = [None] * min(self.batch_size, len(queue))
        layers: list[BufferLayer] = []
        cache = mask = None
        reported = 0
        while True:
            free = [k for k, r in enumerate(rows) if r is None]
            while queue and free:  # refill every free slot: newcomers prefilled together
                chunk = self._take(queue, ids, len(free))
                prompt_cache, logits, chunk_mask = self._prefill(chunk, ids)
                newcomers = []
                for i in chunk:
                    s, rng = samplings[i], None
                    if s.temperature > 0:
                        rng = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + i)
                    newcomers.append(_Row(i, s, rng, position=len(ids[i])))
                ended = set(self._step(newcomers, logits, want_logprobs, out))
                # A newcomer that ended on its first token never takes a slot.
                staying = [k for k in range(len(chunk)) if k not in ended]
                if not staying:
                    continue
                if cache is None:
                    like = prompt_cache.layers[0].keys
                    layers = [BufferLayer(like, len(rows), chunk_mask.shape[1]) for _ in prompt_cache.layers]
                    cache = DynamicCache()
                    cache.layers = layers
                    mask = torch.zeros(len(rows), chunk_mask.shape[1], dtype=torch.long, device=self.device)
                width, length = mask.shape[1], chunk_mask.shape[1]
                if length > width:  # wider than the cache: pad every row on the left
                    for layer in layers:
                        layer.pad_left(length - width)
                    mask = torch.cat([mask.new_zeros(mask.shape[0], length - width), mask], 1)
                    width = length
                slots, free = free[: len(staying)], free[len(staying) :]
                picked = torch.tensor(staying, device=self.device)
                targets = torch.tensor(slots, device=self.device)
                for layer, prompt_layer in zip(layers, prompt_cache.layers):
                    layer.put(targets, prompt_layer.keys[picked], prompt_layer.values[picked])
                mask[targets] = 0
                mask[targets, width - length :] = chunk_mask[picked]
                for slot, k in zip(slots, staying):
                    rows[slot] = newcomers[k]
            if on_progress is not None and self.done > reported:
                on_progress(self.done, self.new_tokens)
                reported = self.done
            live = [k for k, r in enumerate(rows) if r]
            if not live:
                break
            # One decode step for every slot (a dead one is fed padding until it is reused or dropped).
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
            for k in live:
                rows[k].position += 1
            live_logits = logits if len(live) == len(rows) else logits[live]
            finished = self._step([rows[k] for k in live], live_logits, want_logprobs, out)
            if not finished:
                continue
            for k in finished:
                rows[live[k]] = None
            # Nothing left to refill with: drop dead slots rather than compute them, once a quarter
            # of them are dead (each drop copies the cache). Either way drop the leading columns
            # that are padding in every live row (a newcomer is right-aligned).
            keep = [k for k, r in enumerate(rows) if r]
            index = None
            if not queue and keep and 4 * (len(rows) - len(keep)) >= len(rows):
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                rows, mask = [rows[k] for k in keep], mask[index]
                keep = list(range(len(rows)))
            live_mask = mask[keep]
            lead = int((live_mask.sum(0) == 0).long().cumprod(0).sum()) if keep else 0
            if lead or index is not None:
                mask = mask[:, lead:]
                for layer in layers:
                    layer.keep(index, lead)
        if on_progress is not None and self.done > reported:
            on_progress(self.done, self.new_tokens)

    def _step(self, rows: list[_Row], logits: torch.Tensor, want_logprobs: bool, out: list) -> list[int]:
        """Choose each row's next token from its logits row; the positions (in `rows`) that ended."""
        sampled = [k for k, r in enumerate(rows) if r.rng is not None]
        if not sampled:
            tokens = logits.argmax(-1)
        elif len(sampled) == len(rows):  # no argmax over the vocabulary for rows that sample
            tokens = self._sample(logits, rows)
        else:
            tokens = logits.argmax(-1)
            tokens[sampled] = self._sample(logits[sampled], [rows[k] for k in sampled])
        if want_logprobs:  # at the row's temperature (greedy rows: 1), before top-p: what ppo trains
            scale = torch.tensor([behaviour_temperature(r.sampling) for r in rows], device=logits.device)
            tempered = logits / scale[:, None].to(logits.dtype)
            taken = (tempered.gather(1, tokens[:, None]).squeeze(1) - tempered.logsumexp(-1)).tolist()
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
    def _sample(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """One token per row: temperature, then top-p as transformers' TopPLogitsWarper (keep the
        smallest top set holding top_p of the mass, at least one token), then the row's own
        uniform draw placed in the cumulative distribution (float64, so it never lands past the end)."""
        temperature = torch.tensor([r.sampling.temperature for r in rows], device=logits.device)
        scores = logits / temperature[:, None].to(logits.dtype)
        probs = (scores - scores.amax(-1, keepdim=True)).exp_()  # unnormalised: the CDF's end is the total
        nucleus = [k for k, r in enumerate(rows) if r.sampling.top_p < 1]
        if nucleus:
            top_p = torch.tensor([rows[k].sampling.top_p for k in nucleus], device=logits.device)
            ordered, order = probs[nucleus].sort(-1)
            ordered = ordered / ordered.sum(-1, keepdim=True)
            drop = ordered.cumsum(-1) <= (1 - top_p)[:, None].to(ordered.dtype)
            drop[:, -1] = False
            kept = ordered.masked_fill(drop, 0)
            probs[nucleus] = torch.empty_like(kept).scatter_(1, order, kept)  # back in vocabulary order
        draws = torch.cat([torch.rand(1, generator=r.rng, device=logits.device) for r in rows]).double()
        cdf = probs.double().cumsum(-1)
        # side="right": the first token whose cumulative mass exceeds the draw, so never a zero-mass one
        return torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).squeeze(1)

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
