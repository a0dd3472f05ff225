"""Rollout generation tokens/s: `looper rollouts` against (a) a raw batched `model.generate` loop
at the same batch size and lengths, and (b) one question and one arm at a time (a naive script).

    .venv/bin/python bench/bench_rollouts.py [--questions 8] [--arms 8] [--max-new-tokens 64]

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

import torch
from common import SMOLLM, machine, prepared_workdir


def arm_requests(workdir: Path, questions: int, arms: int, tokenizer):
    """The (prompt, temperature) pairs looper generates for these questions, s_cf re-asks included."""
    from looper.artifacts import Store, read_rows
    from looper.data.prompts import render_prompt, tutoring_messages
    from looper.regime_w.arms import select_arms
    from looper.regime_w.perturb import perturb

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--arms", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--naive-requests", type=int, default=16, help="requests timed one at a time (a rate)"
    )
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from looper.artifacts import read_rows
    from looper.config import RolloutsConfig
    from looper.models import resolve_model
    from looper.stages import rollouts

    workdir = prepared_workdir(Path(tempfile.mkdtemp()))
    path = resolve_model(SMOLLM).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    requests = arm_requests(workdir, args.questions, args.arms, tokenizer)

    raw_tokens, raw_s = raw_generate(model, tokenizer, requests, args.batch_size, args.max_new_tokens)
    started = time.perf_counter()
    result = rollouts.run(
        RolloutsConfig(
            model=SMOLLM,
            workdir=str(workdir),
            policy="base",
            limit=args.questions,
            arms=args.arms,
            batch_size=args.batch_size,
            backend="hf",
            max_new_tokens=args.max_new_tokens,
            shard_size=args.questions,
            force=True,
        )
    )
    looper_s = time.perf_counter() - started
    rows = [r for f in Path(result.path).glob("shard-*.parquet") for r in read_rows(f)]
    looper_tokens = sum(o["tokens"] for r in rows for o in r["arm_outputs"]) + sum(
        c["tokens"] for r in rows for c in r["cf_outputs"]
    )
    naive_tokens, naive_s = raw_generate(
        model, tokenizer, requests[: args.naive_requests], 1, args.max_new_tokens
    )

    raw_rate, ours, naive = raw_tokens / raw_s, looper_tokens / looper_s, naive_tokens / naive_s
    print(f"machine: {machine()}")
    print(
        f"{len(requests)} completions ({args.questions} questions x {args.arms} arms + 2 s_cf re-asks), "
        f"batch {args.batch_size}, max {args.max_new_tokens} new tokens"
    )
    print(f"raw batched generate:      {raw_rate:6.1f} tokens/s  ({raw_tokens} tokens, {raw_s:.1f} s)")
    print(
        f"looper rollouts (whole):   {ours:6.1f} tokens/s  ({looper_tokens} tokens, {looper_s:.1f} s)  "
        f"ratio vs raw {ours / raw_rate:.2f}x"
    )
    print(
        f"one at a time (naive):     {naive:6.1f} tokens/s  ({naive_tokens} tokens, {naive_s:.1f} s)  "
        f"looper / naive {ours / naive:.2f}x"
    )


if __name__ == "__main__":
    main()
