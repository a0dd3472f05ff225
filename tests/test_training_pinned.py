"""Pinned training curves (torchtune-style): sft, ppo and dpo on the tiny model for a few steps,
their logged loss and gradient norm compared with values recorded on a CPU.

A change in TRL, transformers, PEFT or torch that changes what training computes, or a change
in Looper's glue (loss masking, the ratio against stored log-probs, advantages, KL, pairing),
fails here with a message saying which and how to re-pin. Values drift by ~1e-6 between thread
counts and CPUs (float summation order), far inside the tolerance; a real change moves them by
percents. To re-pin after checking that a change is intended: run this file, and paste the
`got` lists from the failure messages into PINNED (and the versions into PINNED_WITH).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
from conftest import last_json
from test_ppo import build_rollouts

pytestmark = pytest.mark.slow

REL, ABS = 2e-3, 1e-4  # tolerance on each logged value
LIBRARIES = ("torch", "transformers", "trl", "peft")
PINNED_WITH = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "trl": "1.16.0", "peft": "0.21.2"}
# ppo re-pinned when it began training each completion at its arm's temperature (0.3 in these
# rollouts): step 1's gradient norm grew 0.215 -> 0.710, the 1/T = 3.3x the tempered log-prob's
# gradient carries.
PINNED: dict[str, dict[str, list[float]]] = {
    "sft": {
        "loss": [6.279699, 6.267837, 6.153214, 6.105983],
        "grad_norm": [0.344401, 0.364072, 0.476249, 0.512062],
    },
    "ppo": {"loss": [0.0, -0.055201, 0.328058], "grad_norm": [0.71038, 0.816439, 8.827654]},
    "dpo": {"loss": [0.693147, 0.241666, 0.079474], "grad_norm": [1.121315, 0.589318, 0.263319]},
}

COMMON = ["--no-gradient-checkpointing", "--save-steps", "100", "--seed", "0", "--json"]
STAGE_ARGS = {
    "sft": [
        "--max-steps",
        "4",
        "--limit",
        "8",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--dev-limit",
        "0",
        "--learning-rate",
        "1e-2",
        "--lora-r",
        "8",
    ],
    "ppo": [
        "--max-steps",
        "3",
        "--questions-per-step",
        "2",
        "--questions-per-minibatch",
        "1",
        "--learning-rate",
        "2e-2",
        "--lora-r",
        "8",
    ],
    "dpo": [
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--pairs-per-question",
        "2",
        "--learning-rate",
        "2e-2",
        "--lora-r",
        "8",
        "--beta",
        "0.5",
    ],
}


def versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def explain(stage: str, key: str, got: list[float], want: list[float]) -> str:
    now = versions()
    changed = {k: f"{PINNED_WITH.get(k)} -> {v}" for k, v in now.items() if PINNED_WITH.get(k) != v}
    if changed:
        cause = (
            "library versions differ from the pinned ones ("
            + ", ".join(f"{k} {v}" for k, v in changed.items())
            + "): read their release notes for a change in what training computes, then re-pin"
        )
    else:
        cause = (
            "same library versions as when pinned: Looper's own training glue changed "
            f"(looper/train/, looper/stages/{stage}.py, the data it is fed); "
            "if that was intended, re-pin"
        )
    return f"{stage} {key} moved beyond rel {REL}/abs {ABS}: {cause}.\n  got  {got}\n  want {want}"


@pytest.mark.parametrize("stage", ["sft", "ppo", "dpo"])
def test_losses_match_pinned_values(run_cli, tiny_model_dir, tmp_path, stage):
    if stage == "sft":
        code, _, err = run_cli(
            "prepare", "--source", "synthetic", "--synthetic-train", "20", "--workdir", tmp_path
        )
        assert code == 0, err
    else:
        build_rollouts(tmp_path, tiny_model_dir)  # 2 questions x 4 arms, half of them right
    code, out, err = run_cli(
        stage, "--model", tiny_model_dir, "--workdir", tmp_path, *STAGE_ARGS[stage], *COMMON
    )
    assert code == 0, err
    logged = [
        json.loads(line) for line in (Path(last_json(out)["path"]) / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [row for row in logged if "loss" in row]
    assert [row["step"] for row in steps] == list(range(1, len(steps) + 1))
    for key in ("loss", "grad_norm"):
        got = [round(row[key], 6) for row in steps]
        want = PINNED.get(stage, {}).get(key)
        assert want is not None, f"{stage} {key} not pinned yet: got {got}"
        assert got == pytest.approx(want, rel=REL, abs=ABS), explain(stage, key, got, want)
