"""End to end: `make all` on pipelines/tiny-test.toml through the real CLI, twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_all(home: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOOPER_CACHE": str(cache)}
    return subprocess.run(
        ["make", "--no-print-directory", "all", "PIPELINE=pipelines/tiny-test.toml", f"LOOPER_HOME={home}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def latest(home: Path, kind: str, stage: str) -> Path:
    root = home / kind / stage
    return root / (root / "LATEST").read_text().strip()


@pytest.mark.slow  # the end-to-end pipeline (installs, trains every stage)
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_all_tiny_pipeline_then_nothing_to_do(tmp_path):
    home = tmp_path / "home"
    first = make_all(home, tmp_path / "cache")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    prepare = latest(home, "data", "prepare")
    sft = latest(home, "checkpoints", "sft")
    rollouts = latest(home, "data", "rollouts")
    ppo = latest(home, "checkpoints", "ppo")
    evaluation = latest(home, "data", "eval")

    # schemas
    assert pq.read_schema(prepare / "train.parquet").names == [
        "id",
        "question",
        "gold_answer",
        "solution",
        "prompt",
        "split",
        "source",
    ]
    assert (sft / "adapter_model.safetensors").is_file() and (ppo / "adapter_model.safetensors").is_file()
    shard = pq.read_table(sorted(rollouts.glob("shard-*.parquet"))[0])
    assert {"arm_outputs", "cf_outputs", "s_end", "s_path", "s_cf", "s_wm", "reward", "arm_rewards"} <= set(
        shard.column_names
    )
    assert len(shard.column("arm_outputs")[0]) == 4
    assert {"id", "model", "completion", "answer", "correct", "tokens", "truncated"} <= set(
        pq.read_schema(evaluation / "completions.parquet").names
    )
    report = json.loads((evaluation / "report.json").read_text())
    assert report and (evaluation / "report.md").is_file() and (evaluation / "accuracy.png").is_file()

    # lineage: each manifest names the version it was built from
    assert manifest(sft)["inputs"]["prepare"]["version"] == prepare.name
    assert manifest(rollouts)["inputs"]["prepare"]["version"] == prepare.name
    assert manifest(rollouts)["policy"]["adapter_path"] == f"checkpoints/sft/{sft.name}"  # home-relative
    assert manifest(rollouts)["inputs"]["sft"]["version"] == sft.name  # a retrained sft makes rollouts stale
    assert manifest(ppo)["inputs"]["rollouts"]["version"] == rollouts.name
    assert manifest(evaluation)["inputs"]["prepare"]["version"] == prepare.name

    # a second `make all` with nothing changed runs no stage at all
    second = make_all(home, tmp_path / "cache")
    assert second.returncode == 0, second.stderr
    assert "looper" not in second.stdout and "Nothing to be done" in second.stdout
