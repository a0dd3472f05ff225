"""`looper eval`'s completions: generated per model, scored, and cached in chunks for resume.

`model_rows` returns one policy's scored completions (ROW_SCHEMA, `sample` 0..k-1 per
question). They are cached under `data/eval/cache/<key>/chunk-NNNNN.parquet`, CHUNK questions
a file, each written atomically as it finishes; the key hashes everything the completions
depend on (policy identity, prompts with ids and gold answers, decoding, samples, format,
seed, backend), so a resumed or extended eval regenerates only what is missing. `score`
checks one completion: looper's answer checker (`chat`) or the harness's strict-match
(`lm-eval`).
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
from rich.markup import escape

from looper.answers import extract_answer, is_correct
from looper.config import EvalConfig
from looper.data import lm_eval_format
from looper.generation import Sampling
from looper.hashing import short_hash
from looper.policy.policies import Policy, load_generator
from looper.store.artifacts import read_rows, write_parquet
from looper.store.integrity import table_reads_back

STAGE = "eval"  # who reports a cached chunk that does not read back
CHUNK = 512  # questions per cache file: the unit of resume
CACHE_SCHEMA = 1  # enters the cache key: bump it when a cached chunk's rows change meaning

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("model", pa.string()),
        ("question", pa.string()),
        ("gold_answer", pa.string()),
        ("completion", pa.string()),
        ("answer", pa.string()),
        ("correct", pa.bool_()),
        ("tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("sample", pa.int32()),
    ]
)


def score(completion: str, gold: str, fmt: str) -> tuple[str | None, bool]:
    """(extracted answer or None, correct): looper's checker, or the harness's strict-match."""
    if fmt == "lm-eval":
        strict = lm_eval_format.strict_extract(completion)
        if strict == lm_eval_format.FALLBACK:
            return None, False
        return strict, lm_eval_format.exact_match(strict, gold)
    return extract_answer(completion), is_correct(completion, gold)


def progress_bar():
    """One bar per model on stderr (stdout stays the result), with questions done and tok/s."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("eval {task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} questions"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def free_memory() -> None:
    """Return a dropped model's memory (and CUDA cache) before the next model loads."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_rows(
    policy: Policy,
    rows: list[dict],
    prompts: list[str],
    config: EvalConfig,
    sampling: Sampling,
    backend: str,
    cache: Path,
    progress,
) -> tuple[list[dict], str]:
    """This policy's scored completions, from the cache where present, else generated chunk by chunk."""
    k = config.samples
    key = short_hash(
        {
            "schema": CACHE_SCHEMA,
            "chunk": CHUNK,
            "policy": policy.identity(),
            "format": config.format,
            "questions": short_hash([[r["id"], r["gold_answer"], p] for r, p in zip(rows, prompts)], n=64),
            "sampling": asdict(sampling),
            "samples": k,
            "seed": config.seed,
            "backend": backend,
            "batch_size": config.batch_size if backend == "hf" else None,
            "hf": [config.scheduler, config.dtype] if backend == "hf" else None,
        }
        # vLLM's dtype is the user's to set too (left out for hf: its caches keep their keys)
        | ({"vllm_dtype": config.dtype} if backend == "vllm" else {}),
        n=16,
    )
    task = progress.add_task(escape(policy.name), total=len(rows), tps=0.0)
    out: list[dict] = []
    generator = None
    tokens, start = 0, time.perf_counter()
    cached = [] if config.force else sorted((cache / key).glob("chunk-*.parquet"))
    if cached:
        print(f"eval: {policy.name}: resuming from {len(cached)} cached chunk(s) in {cache / key}")
    try:
        for c, first in enumerate(range(0, len(rows), CHUNK)):
            chunk = rows[first : first + CHUNK]
            path = cache / key / f"chunk-{c:05d}.parquet"
            if not config.force and table_reads_back(path, STAGE):
                out += [r | {"model": policy.name} for r in read_rows(path)]
                progress.update(task, completed=first + len(chunk))
                continue
            if generator is None:
                generator, _ = load_generator(
                    policy,
                    backend=backend,
                    batch_size=config.batch_size,
                    trust_remote_code=config.trust_remote_code,
                    require_chat_template=config.format != "lm-eval",
                    scheduler=config.scheduler,
                    dtype=config.dtype,
                    options=config,
                    prompts=lambda _tokenizer: prompts,  # vLLM sizes its context for the longest
                )
                start = time.perf_counter()

            # start and tokens are read at call time on purpose: the running totals of this chunk
            def on_progress(done: int, new_tokens: int, first: int = first) -> None:
                elapsed = max(time.perf_counter() - start, 1e-9)  # noqa: B023
                progress.update(task, completed=first + done / k, tps=(tokens + new_tokens) / elapsed)  # noqa: B023

            completions = generator.generate(
                [p for p in prompts[first : first + CHUNK] for _ in range(k)],
                sampling,
                seed=config.seed + c,
                on_progress=on_progress,
                logprobs=False,  # scoring needs the text only: no per-token log-probs kept
            )
            tokens += sum(x.tokens for x in completions)
            scored = []
            for j, comp in enumerate(completions):
                question = chunk[j // k]
                answer, correct = score(comp.text, question["gold_answer"], config.format)
                scored.append(
                    {
                        "id": question["id"],
                        "model": policy.name,
                        "question": question["question"],
                        "gold_answer": question["gold_answer"],
                        "completion": comp.text,
                        "answer": answer,
                        "correct": correct,
                        "tokens": comp.tokens,
                        "truncated": comp.finish_reason == "length",
                        "sample": j % k,
                    }
                )
            write_parquet(path, scored, ROW_SCHEMA)
            out += scored
    finally:
        if generator is not None and callable(getattr(generator, "close", None)):
            generator.close()
        generator = None  # the last reference to the model: freed before the next one loads
        free_memory()
    return out, key
