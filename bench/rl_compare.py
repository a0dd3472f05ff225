"""On the same rollouts: ppo (--reward arm, question, correctness), dpo, expert iteration and the
gold-SFT control, each against sft.

    .venv/bin/python bench/rl_compare.py --config pipelines/rl-cpu.toml --workdir runs/rl-cpu [--rollouts V]
        [--methods arm,question,correctness,dpo,expert,gold] [--learning-rate LR]
        [--per-question 4] [--expert-epochs 2]

`expert` is one round of expert iteration on the rollouts (`looper sft --rollouts V --per-question K
--epochs E`, continuing their adapter); `gold` continues the same sft adapter on as many gold
solutions (the first N train questions, N = the completions expert kept) for as many epochs
(`looper sft --continue-from`), so a gain of expert iteration can be told apart from "more SFT".

Run after `looper loop` (or `looper rollouts`) in that home. Every method trains from the same
rollouts artifact (default: round 1 of the latest loop, i.e. rolled out by sft; else the latest
rollouts) with the pipeline file's [ppo] / [dpo] table, then one eval compares sft with every
adapter on the [eval] table's questions (300 test questions in rl-cpu): accuracy with its Wilson
interval, and per method the paired-bootstrap interval and McNemar p against sft. A method that
fails (e.g. dpo with no correct/incorrect pair) is reported as such, not skipped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looper.config import STAGE_CONFIGS, build_config, read_pipeline_file  # noqa: E402
from looper.errors import LooperError  # noqa: E402
from looper.loop.run import gold_sft  # noqa: E402
from looper.store.artifacts import Store  # noqa: E402

METHODS = (
    ("ppo", {"reward": "arm"}),
    ("ppo", {"reward": "question"}),
    ("ppo", {"reward": "correctness"}),
    ("dpo", {}),
    ("sft", {"method": "expert"}),
    ("sft", {"method": "gold"}),
)


def stage_config(tables: dict, stage: str, workdir: str, **values):
    return build_config(
        STAGE_CONFIGS[stage], file_values=tables.get(stage, {}), cli_values={"workdir": workdir, **values}
    )


def default_rollouts(store: Store) -> str:
    """Round 1's rollouts of the latest loop (sampled from sft), else the latest rollouts."""
    if store.latest("loop"):
        return store.resolve("loop").manifest["rounds"][0]["rollouts"]["version"]
    return store.resolve("rollouts").version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rollouts", help="rollouts version (default: round 1 of the latest loop)")
    parser.add_argument(
        "--methods",
        default="arm,question,correctness,dpo",
        help="which of arm, question, correctness (ppo --reward ...) and dpo to train (default: all)",
    )
    parser.add_argument("--learning-rate", type=float, help="override the [ppo] and [dpo] learning rate")
    parser.add_argument(
        "--per-question", type=int, default=4, help="expert: correct completions per question"
    )
    parser.add_argument("--expert-epochs", type=float, default=2.0, help="expert and gold: epochs")
    args = parser.parse_args()

    from looper.stages import dpo, evaluate, ppo
    from looper.stages import sft as sft_stage

    tables = read_pipeline_file(args.config)
    store = Store(args.workdir)
    rollouts = args.rollouts or default_rollouts(store)
    # the sft trained on gold solutions from the base: a loop's expert rounds (and this bench's expert and
    # gold methods) publish sft versions of their own, which move sft's LATEST
    base_sft = gold_sft(store)
    sft = str(base_sft.path)
    adapters, failures = {}, {}
    chosen = set(args.methods.split(","))
    name = lambda values, stage: values.get("reward", values.get("method", stage))  # noqa: E731
    if unknown := chosen - {name(v, stage) for stage, v in METHODS}:
        parser.error(
            f"--methods: unknown {sorted(unknown)}; choose from {', '.join(name(v, s) for s, v in METHODS)}"
        )
    overrides = {"learning_rate": args.learning_rate} if args.learning_rate else {}
    kept = None  # completions expert iteration trained on: the gold control gets as many gold solutions
    sft_tables = tables | {"sft": {k: v for k, v in tables.get("sft", {}).items() if k != "max_steps"}}
    for stage, values in METHODS:
        method = name(values, stage)
        if method not in chosen:
            continue
        label = {"expert": "expert iteration (sft on own correct)", "gold": "gold-SFT control"}.get(
            method, stage + "".join(f" --reward {v}" for v in values.values())
        )
        try:
            if method == "expert":
                config = stage_config(
                    sft_tables, "sft", args.workdir, rollouts=rollouts, per_question=args.per_question,
                    epochs=args.expert_epochs,
                )  # fmt: skip
                result = sft_stage.run(config)
                kept = result.counts["train_completions"]
            elif method == "gold":
                if kept is None:
                    raise LooperError("the gold control needs the expert method in the same run (its size)")
                config = stage_config(
                    sft_tables, "sft", args.workdir, continue_from=base_sft.version, limit=kept,
                    epochs=args.expert_epochs,
                )  # fmt: skip
                result = sft_stage.run(config)
            else:
                result = (ppo if stage == "ppo" else dpo).run(
                    stage_config(tables, stage, args.workdir, rollouts=rollouts, **values, **overrides)
                )
            adapters[label] = result.path
        except LooperError as exc:
            failures[label] = str(exc)
    result = evaluate.run(
        stage_config(tables, "eval", args.workdir, compare=",".join([sft, *adapters.values()]))
    )
    report = json.loads((Path(result.path) / "report.json").read_text())

    def row(name: str, path: str) -> str:
        e = report["models"][path]
        line = f"| {name} | {100 * e['accuracy']:.1f}% [{100 * e['ci95'][0]:.1f}, {100 * e['ci95'][1]:.1f}] |"
        if path == sft:
            return line + " - | - |"
        pair = report["pairs"][f"{sft} vs {path}"]
        return line + (
            f" {100 * pair['diff']:+.1f} pts [{100 * pair['ci95'][0]:+.1f}, {100 * pair['ci95'][1]:+.1f}] | "
            f"{pair['mcnemar_p']:.3g} |"
        )

    print(
        f"rollouts {rollouts}; eval {result.version}: {report['questions']} questions "
        f"({report['settings']['questions_from']})"
    )
    print("| method | accuracy [95% Wilson] | vs sft [paired bootstrap 95%] | McNemar p |")
    print("|---|---|---|---|")
    print(row("sft", sft))
    for label, path in adapters.items():
        print(row(label, path))
    for label, message in failures.items():
        print(f"| {label} | failed: {message} | | |")


if __name__ == "__main__":
    main()
