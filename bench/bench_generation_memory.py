"""Peak memory of HF-backend generation: keeping every step's logits (before) vs step-by-step
log-probs (rollouts, after) vs no log-probs (eval, after).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_generation_memory.py [--batch 16] [--max-new-tokens 256]

SmolLM2-135M-Instruct (float32 on CPU, vocab 49,152), `--batch` GSM8K tutoring prompts, one
`generate` call of `--max-new-tokens` at temperature 0.7, the same seed for every variant (so
the same tokens and the same number of steps). Each variant runs in its own subprocess:

* `before`: the hf backend as it was, `model.generate(..., output_logits=True,
  return_dict_in_generate=True)` then gather - logsumexp per step (B x T x V float32 kept);
* `rollouts`: `HFGenerator.generate(...)` now: the `SampledLogprobs` logits processor;
* `eval`: `HFGenerator.generate(..., logprobs=False)` now.

What is measured: the process's peak resident set size (Linux VmHWM) during the generate call
alone. After the model is loaded and one warm-up token generated, the peak is reset
(`/proc/self/clear_refs` = 5), so the figure is "RSS at the start of generate" + whatever
generate allocated at its highest; "extra" is that peak minus the RSS at the start. Linux only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("before", "rollouts", "eval")


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def old_generate(gen, prompts: list[str], sampling) -> int:
    """The hf backend's `_batch` before this change (one batch): all raw logits kept."""
    import torch

    rows = gen.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), gen.pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        input_ids[r, width - len(row) :], mask[r, width - len(row) :] = torch.tensor(row), 1
    result = gen.model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=gen.eos_ids,
        pad_token_id=gen.eos_ids[0],
        repetition_penalty=1.0,
        output_logits=True,
        return_dict_in_generate=True,
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=0,
    )
    gen_ids = result.sequences[:, width:]
    logprobs = torch.stack(
        [
            step.gather(1, gen_ids[:, t, None]).squeeze(1).float() - step.float().logsumexp(-1)
            for t, step in enumerate(result.logits)
        ],
        dim=1,
    )
    return int(logprobs.shape[1])


def child(variant: str, batch: int, max_new_tokens: int) -> dict:
    """Runs in the subprocess: load, warm up, reset the peak, generate once, report."""
    import torch

    from looper.data.prompts import render_prompt, tutoring_messages
    from looper.data.synthetic import generate as synthetic
    from looper.generation import Sampling
    from looper.generation.hf import HFGenerator
    from looper.policy import models

    sys.path.insert(0, str(Path(__file__).parent))
    from common import SMOLLM

    source = models.resolve_model(SMOLLM)
    tokenizer = models.load_tokenizer(source)
    model = models.load_model(source, quant="none").eval()
    questions = [p["question"] for p in synthetic(batch, seed=0, difficulty=3)]
    prompts = [render_prompt(tokenizer, tutoring_messages(q)) for q in questions]
    # longest first, the order HFGenerator batches in: every variant samples the same rows alike
    prompts.sort(key=lambda p: -len(tokenizer(p, add_special_tokens=False)["input_ids"]))
    gen = HFGenerator(model, tokenizer, batch_size=batch)
    gen.generate(prompts[:1], Sampling(max_new_tokens=1))  # warm-up: lazy allocations outside the peak
    sampling = Sampling(temperature=0.7, top_p=1.0, max_new_tokens=max_new_tokens)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start_rss = rss_kib("VmRSS")
    began = time.perf_counter()
    with torch.inference_mode():
        torch.manual_seed(0)
        if variant == "before":
            steps = old_generate(gen, prompts, sampling)
        else:
            # seed chosen so HFGenerator's per-batch seed (seed * 1_000_003 + 0) is 0, as above
            out = gen.generate(prompts, sampling, seed=0, logprobs=variant == "rollouts")
            steps = max(len(c.token_ids) for c in out)
    seconds = time.perf_counter() - began
    peak = rss_kib("VmHWM")
    return {
        "variant": variant,
        "batch": batch,
        "steps": steps,
        "vocab": model.config.vocab_size,
        "rss_start_mib": start_rss / 1024,
        "peak_rss_mib": peak / 1024,
        "extra_mib": (peak - start_rss) / 1024,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--parallel", action="store_true", help="run the variants' processes at once")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.max_new_tokens)))
        return

    from common import machine

    print(machine())
    results = []
    variants = args.variants.split(",")
    command = [
        sys.executable,
        __file__,
        "--batch",
        str(args.batch),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    # --parallel: every variant's process at once (each measures its own peak RSS; only time is shared)
    procs = [
        subprocess.Popen([*command, "--child", v], stdout=subprocess.PIPE, text=True) for v in variants[:1]
    ]
    if args.parallel:
        procs += [
            subprocess.Popen([*command, "--child", v], stdout=subprocess.PIPE, text=True)
            for v in variants[1:]
        ]
    for i, variant in enumerate(variants):
        if i >= len(procs):
            procs.append(subprocess.Popen([*command, "--child", variant], stdout=subprocess.PIPE, text=True))
        stdout, _ = procs[i].communicate()
        if procs[i].returncode:
            raise SystemExit(f"variant {variant} failed (exit {procs[i].returncode})")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"{variant:9s} steps {r['steps']:4d}  RSS at start {r['rss_start_mib']:7.0f} MiB  "
            f"peak {r['peak_rss_mib']:7.0f} MiB  extra {r['extra_mib']:7.0f} MiB  {r['seconds']:.1f} s"
        )
    r0 = results[0]
    if len({r["steps"] for r in results}) > 1:
        print("note: the variants generated different numbers of steps")
    logits_mib = r0["batch"] * r0["steps"] * r0["vocab"] * 4 / 2**20
    print(f"B x T x V float32 logits for these runs: {logits_mib:.0f} MiB")


if __name__ == "__main__":
    main()
