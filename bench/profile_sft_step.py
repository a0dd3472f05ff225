"""Where a CPU sft step's time goes: one LoRA training step of SmolLM2-135M, as `looper sft` runs it.

    .venv/bin/python bench/profile_sft_step.py [--dtype float32|bfloat16] [--lora-dropout 0.05]
                                                [--batch 8] [--prompt 112] [--completion 35]

Looper's LoRA (its defaults: r 32 on every projection), TRL's fused LM head made compact
(`compact_fused_head_on_cpu`), AdamW; random token ids shaped like the demo's sft batch (8 rows of a
112-token prompt and a 35-token completion, the loss on the completion). Prints seconds per step
(mean of 2 after a warm-up) and torch's profile of one more step, by self CPU time.
"""

from __future__ import annotations

import argparse
import time

from common import SMOLLM, machine

# isort: split
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=112)
    parser.add_argument("--completion", type=int, default=35)
    parser.add_argument("--rows", type=int, default=20, help="profile rows to print")
    args = parser.parse_args()

    from peft import get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from trl.trainer.utils import add_fused_lm_head

    from looper.config import SftConfig
    from looper.policy import models
    from looper.train import runner
    from looper.train.trl_internals import compact_fused_head_on_cpu

    compact_fused_head_on_cpu()
    model = models.load_model(models.resolve_model(SMOLLM))
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer installs
    model = get_peft_model(model, runner.lora_config(SftConfig(lora_dropout=args.lora_dropout)))
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.prompt + args.completion))
    labels = ids.clone()
    labels[:, : args.prompt] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            out = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    started = time.perf_counter()
    step()
    step()
    print(f"machine: {machine()}")
    print(
        f"{args.dtype}, lora_dropout {args.lora_dropout}, {args.batch} x {args.prompt}+{args.completion} "
        f"tokens: {(time.perf_counter() - started) / 2:.2f} s/step"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
