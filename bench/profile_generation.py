"""Where HF-backend generation time goes on this CPU: decode step vs batch, threads, and a split of
a short generate call into prefill, decode and everything outside the model's forward.

    .venv/bin/python bench/profile_generation.py [--batches 16,32,64,128] [--context 250]
        [--threads 1,2] [--dtypes float32,bfloat16] [--prompts 32] [--max-new-tokens 32]
        [--runs static:16,continuous:16,continuous:64]

Part 1 times one decode step (median of 5) of SmolLM2-135M-Instruct, per dtype of `--dtypes`, with
the continuous scheduler's KV cache (`BufferLayer`: no per-step cache copy) at `--context` cached
positions, per batch and thread count, beside its memory roofline: the bytes the step reads at
least (every weight at the dtype + the rows' KV cache), the cores' copy bandwidth measured at that
thread count, and the share of it the step reached. Part 2 runs in the first dtype. Part 2 runs `make_generator(...).generate` on the first `--prompts` rollout
requests of 8 arms (GSM8K train, mixed temperatures) for each scheduler:batch of `--runs` and
splits its wall-clock by timing the model's forward calls. Minutes, not a benchmark of record: the
figures are for reading ratios (and the load average printed with them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import SMOLLM, decode_step_bytes, load_line, machine, memory_bandwidth, prepared_workdir

# isort: split
import torch  # after common: the thread policy is in the environment when torch loads


def decode_step_ms(model, batch: int, context: int) -> float:
    """Median wall-clock of one decode step at `batch` rows over `context` cached positions."""
    from transformers import DynamicCache

    from looper.generation.continuous import BufferLayer

    prompt_cache = DynamicCache()
    model(
        input_ids=torch.randint(100, 1000, (1, context)), cache=prompt_cache, use_cache=True, logits_to_keep=1
    )
    cache = DynamicCache()
    cache.layers = []
    for layer in prompt_cache.layers:
        buffered = BufferLayer(layer.keys, batch, context)
        buffered.put(
            torch.arange(batch), layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)
        )
        cache.layers.append(buffered)
    mask = torch.ones(batch, context, dtype=torch.long)
    times = []
    for step in range(6):
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        started = time.perf_counter()
        model(
            input_ids=torch.randint(100, 1000, (batch, 1)),
            cache=cache,
            attention_mask=mask,
            position_ids=torch.full((batch, 1), context + step),
            use_cache=True,
            logits_to_keep=1,
        )
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times[1:])  # the first step warms up


def split_generate(
    model, tokenizer, requests, scheduler: str, batch: int, max_new_tokens: int, bandwidth: float
) -> str:
    """One generate call, its wall-clock split into prefill / decode forwards and the rest; the
    decode forwards' bytes (weights + each step's rows x attention-mask width of KV cache) against
    `bandwidth`."""
    from looper.generation import Sampling
    from looper.generation.factory import make_generator

    spent = {"prefill": [0, 0.0, 0], "decode": [0, 0.0, 0]}  # calls, seconds, rows
    forward = model.forward
    decode_bytes = [0.0]

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = forward(*args, **kwargs)
        rows, width = kwargs["input_ids"].shape
        entry = spent["prefill" if width > 1 else "decode"]
        if width == 1 and kwargs.get("attention_mask") is not None:
            decode_bytes[0] += decode_step_bytes(model, rows, kwargs["attention_mask"].shape[1] - 1)
        entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + time.perf_counter() - started, entry[2] + rows
        return result

    model.forward = timed
    try:
        generator = make_generator(
            "hf", model=model, tokenizer=tokenizer, batch_size=batch, scheduler=scheduler
        )
        samplings = [Sampling(temperature=t, max_new_tokens=max_new_tokens) for _, t in requests]
        started = time.perf_counter()
        out = generator.generate([p for p, _ in requests], samplings, seed=1)
        wall = time.perf_counter() - started
    finally:
        del model.forward  # back to the class's forward
    tokens = sum(c.tokens for c in out)
    parts = "; ".join(
        f"{name} {calls} calls {seconds:.1f} s ({1e3 * seconds / max(calls, 1):.0f} ms/call, "
        f"{rows / max(calls, 1):.1f} rows)"
        for name, (calls, seconds, rows) in spent.items()
    )
    outside = wall - sum(seconds for _, seconds, _ in spent.values())
    decode_s = max(spent["decode"][1], 1e-9)
    return (
        f"{scheduler} batch {batch}: {tokens / wall:5.1f} tokens/s ({tokens} tokens, {wall:.1f} s); {parts}; "
        f"outside forward {outside:.1f} s; decode read {decode_bytes[0] / 1e9:.1f} GB at "
        f"{decode_bytes[0] / decode_s / 1e9:.1f} GB/s, {100 * decode_bytes[0] / decode_s / bandwidth:.0f}% of "
        f"the memory roofline  [{load_line()}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="16,32,64,128")
    parser.add_argument("--context", type=int, default=250)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help="decode-step dtypes; part 2 uses the first"
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--runs", default="static:16,continuous:16,continuous:64", help="scheduler:batch,... ('' for none)"
    )
    args = parser.parse_args()
    from bench_rollouts import arm_requests
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from looper.policy.models import resolve_model

    path = resolve_model(SMOLLM).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtypes = args.dtypes.split(",")
    print(f"machine: {machine()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with torch.inference_mode():
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            bandwidth = memory_bandwidth()
            print(
                f"copy bandwidth, {threads} thread(s): {bandwidth / 1e9:.1f} GB/s  [{load_line()}]",
                flush=True,
            )
            for dtype in dtypes:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
                for batch in map(int, args.batches.split(",")):
                    ms = decode_step_ms(model, batch, args.context)
                    step_bytes = decode_step_bytes(model, batch, args.context)
                    print(
                        f"decode step, {dtype}, {threads} thread(s), batch {batch:3d}, context {args.context}: "
                        f"{ms:7.1f} ms, {ms / batch:5.1f} ms/token; reads {step_bytes / 1e6:.0f} MB: "
                        f"{step_bytes / ms / 1e6:.1f} GB/s, {100 * step_bytes / (ms / 1e3) / bandwidth:.0f}% "
                        f"of the memory roofline  [{load_line()}]",
                        flush=True,
                    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtypes[0])).eval()
    if not args.runs:
        return
    torch.set_num_threads(int(args.threads.split(",")[0]))
    bandwidth = memory_bandwidth()
    questions = -(-args.prompts // 10)  # 8 arms + 2 s_cf re-asks per question
    requests = arm_requests(prepared_workdir(Path(tempfile.mkdtemp())), questions, 8, tokenizer)[
        : args.prompts
    ]
    for run in args.runs.split(","):
        scheduler, batch = run.split(":")
        print(
            split_generate(model, tokenizer, requests, scheduler, int(batch), args.max_new_tokens, bandwidth),
            flush=True,
        )


if __name__ == "__main__":
    main()
