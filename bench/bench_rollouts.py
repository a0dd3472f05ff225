"""Rollout generation tokens/s: `looper rollouts` against (a) a raw batched `model.generate` loop
at the same batch size and lengths, and (b) one question and one arm at a time (a naive script).

    .venv/bin/python bench/bench_rollouts.py [--questions 8] [--arms 8] [--max-new-tokens 64]
        [--scheduler continuous] [--dtype auto] [--looper-batch-size 0] [--also-static] [--compare-hf-cb 16]

The raw baseline is static batches of `--batch-size` (16) grouped by temperature, left padding,
float32, `generate` alone timed. looper runs at its default `--batch-size` (on a CPU: 64 with
`--scheduler continuous`, 16 with static) unless `--looper-batch-size` says otherwise; the batch is
printed next to its figures, and so is the dtype it samples in (`--dtype auto`: bfloat16 on a
CPU with AVX-512 BF16/AMX). Two rooflines: the FLOP line converts tokens/s into a share of the
cores' measured float32 matmul FLOP/s (FLOPs per token: 2 x matmul weights + attention over the
mean context); the memory line, the one that binds decode on a CPU, gives the bytes a decode step
reads (every weight at the run's dtype + the KV cache of its live rows at the mean context), the
cores' measured copy bandwidth, the tokens/s that allows at the run's batch, and the share of it
each run reached (whole-run tokens/s: prefill and everything outside decode count against it). `--also-static` also times the stage with `--scheduler static`; `--compare-hf-cb N`
times transformers' own continuous batching (`model.generate_batch`, paged attention) against
looper's scheduler, greedy, on the first N prompts, and counts identical outputs. Every timed
figure is printed with the load average: on a shared box the ratios are what to read.

SmolLM2-135M-Instruct on CPU, policy = base, the same GSM8K train questions and arm prompts for
all three. looper's figure is the whole stage (`rollouts.run`: generation of the arms and the
s_cf re-asks, answer extraction, scoring, Parquet shards, manifest) timed end to end with the
model already converted; the baselines only generate. Tokens are generated tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import (
    SMOLLM,
    decode_step_bytes,
    flops_per_token,
    load_line,
    machine,
    matmul_flops,
    memory_bandwidth,
    memory_roofline_tokens,
    prepared_workdir,
)

# isort: split
import torch  # after common: the thread policy is in the environment when torch loads


def arm_requests(workdir: Path, questions: int, arms: int, tokenizer):
    """The (prompt, temperature) pairs looper generates for these questions, s_cf re-asks included."""
    from looper.data.prompts import render_prompt, tutoring_messages
    from looper.regime_w.arms import select_arms
    from looper.regime_w.perturb import perturb
    from looper.store.artifacts import Store, read_rows

    rows = read_rows(Store(workdir).resolve("prepare").path / "train.parquet")[:questions]
    chosen = select_arms(arms)
    requests = []
    for row in rows:
        requests += [
            (render_prompt(tokenizer, tutoring_messages(row["question"], a.instruction)), a.temperature)
            for a in chosen
        ]
        for kind, arm in zip(("irrelevant", "question_first"), chosen[:2]):
            question = perturb(row["question"], kind, key=row["id"])
            requests.append(
                (render_prompt(tokenizer, tutoring_messages(question, arm.instruction)), arm.temperature)
            )
    return requests


def raw_generate(model, tokenizer, requests, batch_size: int, max_new_tokens: int) -> tuple[int, float]:
    """Batched model.generate, grouped by temperature, left padding: tokens generated, seconds."""
    tokenizer.padding_side = "left"
    started, tokens = time.perf_counter(), 0
    by_temp: dict[float, list[str]] = {}
    for prompt, temp in requests:
        by_temp.setdefault(temp, []).append(prompt)
    with torch.inference_mode():
        for temp, prompts in by_temp.items():
            for i in range(0, len(prompts), batch_size):
                batch = tokenizer(
                    prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
                )
                out = model.generate(
                    **batch,
                    do_sample=True,
                    temperature=temp,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, batch["input_ids"].shape[1] :]
                tokens += int(((new != tokenizer.pad_token_id).cumprod(1)).sum())
    return tokens, time.perf_counter() - started


def compare_hf_cb(model, tokenizer, requests, max_new_tokens: int, batch_size: int) -> None:
    """transformers' generate_batch vs looper's ContinuousGenerator: greedy, same prompts."""
    from transformers import GenerationConfig

    from looper.generation import Sampling
    from looper.generation.continuous import ContinuousGenerator
    from looper.generation.hf import eos_token_ids

    prompts = [p for p, _ in requests]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos = eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    started = time.perf_counter()
    theirs = model.generate_batch(ids, generation_config=config, max_new_tokens=max_new_tokens)
    theirs_s = time.perf_counter() - started
    theirs = [list(o.generated_tokens) for o in theirs.values()]
    started = time.perf_counter()
    ours = ContinuousGenerator(model, tokenizer, batch_size).generate(
        prompts, Sampling(max_new_tokens=max_new_tokens), logprobs=False
    )
    ours_s = time.perf_counter() - started
    same = sum(a == o.token_ids for a, o in zip(theirs, ours))
    n_theirs, n_ours = sum(len(t) for t in theirs), sum(len(o.token_ids) for o in ours)
    print(
        f"transformers generate_batch (greedy, {len(prompts)} prompts): {n_theirs / theirs_s:6.1f} tokens/s "
        f"({n_theirs} tokens, {theirs_s:.1f} s); looper continuous: {n_ours / ours_s:6.1f} tokens/s "
        f"({n_ours} tokens, {ours_s:.1f} s); identical outputs {same}/{len(prompts)}  [{load_line()}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--arms", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="the raw baseline's batch (stays 16)")
    parser.add_argument(
        "--looper-batch-size",
        type=int,
        default=0,
        help="looper's --batch-size (0: its default for the scheduler)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--naive-requests", type=int, default=16, help="requests timed one at a time (a rate)"
    )
    parser.add_argument("--scheduler", choices=("continuous", "static"), default="continuous")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--also-static", action="store_true", help="also time looper --scheduler static")
    parser.add_argument(
        "--compare-hf-cb", type=int, default=0, metavar="N", help="also time transformers' generate_batch"
    )
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from looper.config import RolloutsConfig
    from looper.generation import default_batch_size
    from looper.policy import models
    from looper.policy.models import resolve_model, set_cpu_threads
    from looper.stages import rollouts
    from looper.store.artifacts import read_rows

    threads = set_cpu_threads()  # what looper's stage sets: the baselines get the same threads
    workdir = prepared_workdir(Path(tempfile.mkdtemp()))
    path = resolve_model(SMOLLM).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    requests = arm_requests(workdir, args.questions, args.arms, tokenizer)

    raw_tokens, raw_s = raw_generate(model, tokenizer, requests, args.batch_size, args.max_new_tokens)
    raw_load = load_line()

    def looper_batch(scheduler: str) -> int:
        return args.looper_batch_size or default_batch_size(scheduler, model.device)

    def looper_run(scheduler: str) -> tuple[int, float, str]:
        started = time.perf_counter()
        result = rollouts.run(
            RolloutsConfig(
                model=SMOLLM,
                workdir=str(workdir),
                policy="base",
                limit=args.questions,
                arms=args.arms,
                batch_size=looper_batch(scheduler),
                backend="hf",
                max_new_tokens=args.max_new_tokens,
                shard_size=args.questions,
                scheduler=scheduler,
                dtype=args.dtype,
                force=True,
            )
        )
        seconds = time.perf_counter() - started
        rows = [r for f in Path(result.path).glob("shard-*.parquet") for r in read_rows(f)]
        tokens = sum(o["tokens"] for r in rows for o in r["arm_outputs"]) + sum(
            c["tokens"] for r in rows for c in r["cf_outputs"]
        )
        return tokens, seconds, load_line()

    looper_tokens, looper_s, looper_load = looper_run(args.scheduler)
    static = looper_run("static") if args.also_static else None
    naive_tokens, naive_s = raw_generate(
        model, tokenizer, requests[: args.naive_requests], 1, args.max_new_tokens
    )

    raw_rate, ours, naive = raw_tokens / raw_s, looper_tokens / looper_s, naive_tokens / naive_s
    peak, bandwidth, peak_load = matmul_flops(), memory_bandwidth(), load_line()
    prompt_len = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p, _ in requests) / len(
        requests
    )
    context = prompt_len + looper_tokens / len(requests) / 2  # mean cached positions per generated token
    per_token = flops_per_token(model, context)
    looper_dtype = models.resolve_dtype(args.dtype, sampling=True)
    print(f"machine: {machine()}; torch threads {threads}")
    print(
        f"{len(requests)} completions ({args.questions} questions x {args.arms} arms + 2 s_cf re-asks), "
        f"raw batch {args.batch_size}, max {args.max_new_tokens} new tokens; looper --scheduler {args.scheduler} "
        f"--dtype {args.dtype} ({looper_dtype}) --batch-size {looper_batch(args.scheduler)}"
    )
    print(
        f"raw batched generate:      {raw_rate:6.1f} tokens/s  ({raw_tokens} tokens, {raw_s:.1f} s)  [{raw_load}]"
    )
    print(
        f"looper rollouts (whole):   {ours:6.1f} tokens/s  ({looper_tokens} tokens, {looper_s:.1f} s)  "
        f"ratio vs raw {ours / raw_rate:.2f}x  (looper batch {looper_batch(args.scheduler)})  [{looper_load}]"
    )
    if static:
        rate = static[0] / static[1]
        print(
            f"looper rollouts (static):  {rate:6.1f} tokens/s  ({static[0]} tokens, {static[1]:.1f} s)  "
            f"ratio vs raw {rate / raw_rate:.2f}x  (looper batch {looper_batch('static')})  [{static[2]}]"
        )
    print(
        f"one at a time (naive):     {naive:6.1f} tokens/s  ({naive_tokens} tokens, {naive_s:.1f} s)  "
        f"looper / naive {ours / naive:.2f}x"
    )
    print(
        f"roofline: {per_token / 1e6:.0f} MFLOP/token (mean context {context:.0f}), matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s measured [{peak_load}]: looper {100 * ours * per_token / peak:.1f}%, "
        f"raw generate {100 * raw_rate * per_token / peak:.1f}%"
    )
    element = {"float32": 4, "bfloat16": 2}[looper_dtype]
    runs = [("looper", ours, min(looper_batch(args.scheduler), len(requests)), element)]
    runs.append(("raw generate", raw_rate, min(args.batch_size, len(requests)), 4))
    if static:
        runs.append(
            ("looper static", static[0] / static[1], min(looper_batch("static"), len(requests)), element)
        )
    shares = []
    for name, rate, rows, size in runs:
        limit = memory_roofline_tokens(model, rows, context, bandwidth, size)
        step_mb = decode_step_bytes(model, rows, context, size) / 1e6
        shares.append(
            f"{name} {100 * rate / limit:.1f}% of {limit:.0f} tokens/s ({step_mb:.0f} MB/step at {rows} rows, "
            f"{8 * size} bit)"
        )
    print(
        f"memory roofline: copy bandwidth {bandwidth / 1e9:.1f} GB/s measured [{peak_load}], mean context "
        f"{context:.0f}: " + "; ".join(shares)
    )
    if args.compare_hf_cb:
        compare_hf_cb(model, tokenizer, requests[: args.compare_hf_cb], args.max_new_tokens, args.batch_size)


if __name__ == "__main__":
    main()
