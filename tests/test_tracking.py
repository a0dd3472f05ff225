"""`--report-to tensorboard`: sft, ppo and dpo write TensorBoard event files (read back with
TensorBoard's own EventAccumulator) that hold the same losses as the artifact's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import last_json
from test_ppo import build_rollouts

pytest.importorskip("tensorboard")

TRAIN = ["--no-gradient-checkpointing", "--save-steps", "100", "--report-to", "tensorboard", "--json"]
STAGE_ARGS = {
    "sft": ["--max-steps", "3", "--limit", "6", "--batch-size", "2", "--grad-accum", "1", "--dev-limit", "0"],
    "ppo": ["--max-steps", "2", "--questions-per-step", "2", "--questions-per-minibatch", "1"],
    "dpo": ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--pairs-per-question", "2"],
}


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("stage", ["sft", "ppo", "dpo"])
def test_tensorboard_events_hold_the_logged_losses(run_cli, tiny_model_dir, tmp_path, stage):
    if stage == "sft":
        code, _, err = run_cli(
            "prepare", "--source", "synthetic", "--synthetic-train", "20", "--workdir", tmp_path
        )
        assert code == 0, err
    else:
        build_rollouts(tmp_path, tiny_model_dir)  # 2 questions x 4 arms, half of them right
    code, out, err = run_cli(
        stage, "--model", tiny_model_dir, "--workdir", tmp_path, *STAGE_ARGS[stage], *TRAIN
    )
    assert code == 0, err
    result = last_json(out)
    log_dir = tmp_path / "tensorboard" / stage / result["version"]
    assert f"{stage}: TensorBoard events -> {log_dir}" in out
    assert list(log_dir.glob("events.out.tfevents.*")), f"no event file in {log_dir}"

    logged = [json.loads(line) for line in (Path(result["path"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [(row["step"], row["loss"]) for row in logged if "loss" in row]
    events = scalars(log_dir)
    assert [step for step, _ in events["train/loss"]] == [step for step, _ in losses]
    assert [v for _, v in events["train/loss"]] == pytest.approx([v for _, v in losses], rel=1e-5, abs=1e-7)
    assert "train/learning_rate" in events
    # nothing left behind in the artifact: the trainer dir (where transformers would write) is gone
    assert not (Path(result["path"]) / "trainer").exists() and not list(
        Path(result["path"]).rglob("events.*")
    )
