"""`looper loop --mode hybrid|expert`: rejection-sampling SFT rounds, with or without ppo; merged exports.

    looper --config pipelines/tiny-test.toml loop --mode hybrid --rounds 2
    looper --config pipelines/rl-cpu.toml loop --mode hybrid --sft-every 2 --sft-growth 2 --export-every 2
    looper --config pipelines/rl-cpu.toml loop --mode expert --per-question 4 --expert-epochs 2

Expert iteration (STaR, RFT; `--mode expert`): every round rolls out the newest policy, keeps up
to `--per-question` distinct correct completions of each question and continues the policy's
adapter with SFT on them for `--expert-epochs` epochs (`looper sft --rollouts`, the [sft] table's
other settings; its max_steps is not used, so the amount of training follows the kept pairs).
At this scale it is known to turn pass@k into pass@1 with fewer samples than policy gradients.

Every round rolls out the newest policy as in the plain loop. Then an SFT round trains on the
best correct arm of each question (`looper sft --rollouts <the round's rollouts>`, continuing
the policy's adapter), any other round runs ppo (or `--algorithm dpo`) on them; the dev eval
follows either way (an SFT round whose rollouts hold no correct arm trains with ppo instead:
there is nothing to imitate). The curriculum goes from SFT-heavy to RL-heavy: round 1 is SFT, the next
SFT round comes `--sft-every` rounds later, and each gap after that is `--sft-growth` times the
one before (every 2, growth 2: SFT in rounds 1, 3, 7, 15, ...; growth 1: a fixed period).

`--export-every K` (both modes): after every K-th round the round's adapter is merged into its
base (`looper export`) under `<home>/exports/loop-<loop version>/round-<k>/`, a standalone model
for vLLM/transformers; an existing export is kept (a resumed loop does not redo it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from looper.store.artifacts import Artifact


def sft_rounds(rounds: int, sft_every: int, growth: int) -> list[int]:
    """The SFT rounds among 1..rounds: 1, then gaps of sft_every, sft_every * growth, ..."""
    out, k, gap = [], 1, sft_every
    while k <= rounds:
        out.append(k)
        k, gap = k + gap, gap * growth
    return out


def hybrid_train_step(train_step: Callable) -> Callable:
    """The round's training: SFT on its best correct arms in an SFT round, else `train_step` (ppo|dpo)."""

    def step(loop, rnd: dict) -> None:
        config = loop.config
        if rnd["round"] not in sft_rounds(rnd["round"], config.sft_every, config.sft_growth):
            return train_step(loop, rnd)
        rollouts = Artifact.load(Path(rnd["rollouts"]["path"])).manifest
        if not rollouts.get("metrics", {}).get("pass_at_n"):  # nothing right to imitate: RL this round
            print(
                f"loop: round {rnd['round']}: no correct arm in the rollouts, so {config.algorithm} instead of sft"
            )
            return train_step(loop, rnd)
        result = loop.run_stage("sft", f"round {rnd['round']}", rollouts=rnd["rollouts"]["version"])
        rnd["train"] = {"stage": "sft", "version": result.version, "path": result.path}

    return step


def expert_train_step(train_step: Callable) -> Callable:
    """The round's training in expert iteration: SFT on its distinct correct completions (ppo|dpo
    only when the rollouts hold no correct arm at all)."""

    def step(loop, rnd: dict) -> None:
        rollouts = Artifact.load(Path(rnd["rollouts"]["path"])).manifest
        if not rollouts.get("metrics", {}).get("pass_at_n"):
            print(
                f"loop: round {rnd['round']}: no correct arm in the rollouts, so {loop.config.algorithm} instead"
            )
            return train_step(loop, rnd)
        result = loop.run_stage(
            "sft",
            f"round {rnd['round']}",
            unset=("max_steps",),
            rollouts=rnd["rollouts"]["version"],
            per_question=loop.config.per_question,
            epochs=loop.config.expert_epochs,
        )
        rnd["train"] = {"stage": "sft", "version": result.version, "path": result.path}

    return step


def export_step(loop, rnd: dict) -> None:
    """The round's adapter merged into its base, every `--export-every` rounds."""
    every = loop.config.export_every
    if not every or rnd["round"] % every:
        return
    from looper.policy.export import export

    target = Path(loop.store.workdir) / "exports" / f"loop-{loop.version}" / f"round-{rnd['round']}"
    if not target.exists():
        export(name=rnd["train"]["path"], out=str(target), workdir=str(loop.store.workdir))
    rnd["export"] = str(target)


def round_steps(config, steps: tuple) -> tuple:
    """The loop's steps for `config.mode`: the plain round, the hybrid or the expert one; the export step in all."""
    steps = dict(steps)
    if config.mode == "hybrid":
        steps["train"] = hybrid_train_step(steps["train"])
    elif config.mode == "expert":
        steps["train"] = expert_train_step(steps["train"])
    return (*steps.items(), ("export", export_step))
