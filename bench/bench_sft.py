"""SFT training tokens/s: `looper sft` against a plain TRL SFTTrainer script, same model/data/settings.

    .venv/bin/python bench/bench_sft.py [--steps 8] [--repeats 2] [--bf16] [--every-position-head]

Both run in this one process on SmolLM2-135M-Instruct (CPU), alternating, on the same 64 GSM8K
train questions, batch 4, LoRA r=32 on the attention+MLP projections, no gradient checkpointing,
AdamW, lr 5e-5. The plain script is what a user would write from TRL's docs: conversational
"messages" rows and SFTTrainer defaults. tokens/s counts real (non-pad) training tokens over the
trainer's own train_runtime (model loading and data preparation excluded on both sides).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import SMOLLM, machine, prepared_workdir


def looper_run(
    workdir: Path,
    steps: int,
    tag: int,
    padding_free: bool = False,
    dtype: str = "auto",
    every_position_head: bool = False,
) -> float:
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton

    from looper.config import SftConfig
    from looper.stages import sft
    from looper.train import trl_internals

    compact = trl_internals.compact_fused_head_on_cpu
    if every_position_head:  # TRL's own CPU path: the fused head scores every position, prompt included
        trl_utils._use_triton = _use_triton
        trl_internals.compact_fused_head_on_cpu = lambda: None

    config = SftConfig(
        model=SMOLLM,
        workdir=str(workdir),
        limit=64,
        max_steps=steps,
        batch_size=4,
        grad_accum=1,
        gradient_checkpointing=False,
        dev_limit=0,
        save_steps=10_000,
        eval_steps=10_000,
        learning_rate=5e-5,
        seed=tag,
        padding_free=padding_free,
        dtype=dtype,
        force=True,
    )
    try:
        result = sft.run(config)
    finally:
        trl_internals.compact_fused_head_on_cpu = compact
    rows = [json.loads(line) for line in open(Path(result.path) / "metrics.jsonl")]
    runtime = next(r["train_runtime"] for r in rows if "train_runtime" in r)
    return result.counts["train_tokens"] / runtime


def plain_trl_run(workdir: Path, steps: int, tag: int) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from looper.policy.models import resolve_model
    from looper.store.artifacts import Store, read_rows

    path = resolve_model(SMOLLM).path
    rows = read_rows(Store(workdir).resolve("prepare").path / "train.parquet")[:64]
    data = Dataset.from_list(
        [{"messages": r["prompt"] + [{"role": "assistant", "content": r["solution"]}]} for r in rows]
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=5e-5,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=tag,
        disable_tqdm=True,
        # TRL >= 1.x defaults to bf16=True (refused on a CPU without use_cpu) and
        # gradient_checkpointing=True: pin both to the settings looper uses here (fp32 on CPU, none).
        bf16=False,
        gradient_checkpointing=False,
    )
    lora = LoraConfig(
        r=32,
        lora_alpha=16,
        lora_dropout=0.05,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora
    )
    result = trainer.train()
    from looper.train.trl_internals import total_train_tokens

    return total_train_tokens(trainer) / result.metrics["train_runtime"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--padding-free", action="store_true", help="also time looper with --padding-free")
    parser.add_argument(
        "--bf16", action="store_true", help="also time looper with --dtype bfloat16 (autocast)"
    )
    parser.add_argument(
        "--every-position-head",
        action="store_true",
        help="also time looper with TRL's CPU head scoring every position (before compact_fused_head_on_cpu)",
    )
    args = parser.parse_args()
    workdir = prepared_workdir(Path(tempfile.mkdtemp()))
    from looper.policy.models import resolve_model

    resolve_model(SMOLLM)  # convert the GGUF once, outside the timings
    plain, ours, ours_pf, ours_bf16, ours_every = [], [], [], [], []
    for i in range(args.repeats):
        started = time.perf_counter()
        plain.append(plain_trl_run(workdir, args.steps, i))
        ours.append(looper_run(workdir, args.steps, i))
        if args.padding_free:
            ours_pf.append(looper_run(workdir, args.steps, i, padding_free=True))
        if args.every_position_head:
            ours_every.append(looper_run(workdir, args.steps, i, every_position_head=True))
            print(f"round {i}: looper, every-position head {ours_every[-1]:.0f} tok/s", flush=True)
        if args.bf16:
            ours_bf16.append(looper_run(workdir, args.steps, i, dtype="bfloat16"))
            print(f"round {i}: looper --dtype bfloat16 {ours_bf16[-1]:.0f} tok/s", flush=True)
        print(
            f"round {i}: plain {plain[-1]:.0f} tok/s, looper {ours[-1]:.0f} tok/s "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"machine: {machine()}")
    print(f"plain TRL SFTTrainer: {p:.0f} tokens/s (median of {args.repeats})")
    print(f"looper sft:           {o:.0f} tokens/s  ratio {o / p:.2f}x")
    if ours_bf16:
        bf = statistics.median(ours_bf16)
        print(f"looper --dtype bfloat16: {bf:.0f} tokens/s  ratio {bf / p:.2f}x ({bf / o:.2f}x looper fp32)")
    if ours_every:
        ev = statistics.median(ours_every)
        print(
            f"looper, every-position head: {ev:.0f} tokens/s  ratio {ev / p:.2f}x (compact {o / ev:.2f}x it)"
        )
    if ours_pf:
        pf = statistics.median(ours_pf)
        print(f"looper --padding-free: {pf:.0f} tokens/s  ratio {pf / p:.2f}x")


if __name__ == "__main__":
    main()
