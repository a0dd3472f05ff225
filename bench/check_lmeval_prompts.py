"""Compare looper's `--format lm-eval` prompts with the prompts a harness run logged (no generation).

    .venv/bin/python bench/check_lmeval_prompts.py SAMPLES_JSONL LOOPER_WORKDIR [--limit 100]

SAMPLES_JSONL: the `samples_gsm8k_local_*.jsonl` that `bench_eval_lmeval.py` (lm-eval --log_samples)
wrote; LOOPER_WORKDIR: a workdir whose latest prepare artifact came from the same GSM8K copy.
Identical prompts give identical greedy completions (same model, dtype, batch), so this checks
the few-shot sampler and prompt layout in seconds instead of a 20-minute rerun.
"""

from __future__ import annotations

import argparse
import json

from looper.data import lm_eval_format
from looper.eval.questions import fewshot_examples
from looper.store.artifacts import Store, read_rows


def harness_prompt(sample: dict) -> str:
    args = sample["arguments"]
    args = args.get("gen_args_0", args) if isinstance(args, dict) else args[0]
    args = args.get("arg_0", args) if isinstance(args, dict) else args
    return args[0] if isinstance(args, list) else args


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("samples")
    parser.add_argument("workdir")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    harness: dict[int, dict] = {}
    for line in open(args.samples):
        sample = json.loads(line)
        harness.setdefault(sample["doc_id"], sample)
    prepare = Store(args.workdir).resolve("prepare")
    rows = read_rows(prepare.path / "test.parquet")[: args.limit]
    shots, note = fewshot_examples(prepare, rows)
    ours = [lm_eval_format.build_prompt(s, r["question"]) for s, r in zip(shots, rows)]
    differ = [i for i in range(len(rows)) if harness_prompt(harness[i]) != ours[i]]
    print(
        f"{len(rows)} questions; few-shot answers: {note}; prompts differing byte for byte: {len(differ)} {differ[:10]}"
    )


if __name__ == "__main__":
    main()
