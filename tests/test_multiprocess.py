"""`torchrun --nproc_per_node 2 -m looper sft|ppo|dpo` on a CPU-only box: one world of 2 processes.

Each stage runs twice on the tiny model with the same data and the same global batch: in one
process (in-process CLI) and under torchrun with 2 processes (gloo). The torchrun run must
end (no hang), leave exactly one artifact written by rank 0 (no `.partial`, one metrics line
per logged step), record `world_size` 2 (1 alone) and take the same number of optimizer steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import last_json
from test_ppo import build_rollouts

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--no-gradient-checkpointing", "--save-steps", "100", "--epochs", "1", "--json"]
STAGES = {  # stage -> its arguments; the global batch is the same for 1 and 2 processes
    "sft": ["--limit", "8", "--batch-size", "2", "--grad-accum", "2", "--dev-limit", "0"],  # 8 / 4: 2 steps
    "ppo": ["--questions-per-step", "2", "--questions-per-minibatch", "1"],  # 4 questions / 2: 2 steps
    "dpo": ["--batch-size", "2", "--grad-accum", "1", "--pairs-per-question", "2"],  # 8 pairs / 2: 4 steps
}
STEPS = {"sft": 2, "ppo": 2, "dpo": 4}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("LOOPER_HOME", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "looper", *args], env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir) -> Path:
    """A prepare artifact (synthetic) and hand-made rollouts (4 questions x 4 arms, 2 right 2 wrong)."""
    from looper.config import PrepareConfig
    from looper.stages import prepare

    workdir = tmp_path_factory.mktemp("mp")
    prepare.run(PrepareConfig(source="synthetic", synthetic_train=20, synthetic_test=4, workdir=str(workdir)))
    build_rollouts(workdir, tiny_model_dir, questions=4)
    return workdir


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_one_world_one_artifact_same_steps(stage, workdir, tiny_model_dir, tmp_path, run_cli):
    alone, pair = tmp_path / "alone", tmp_path / "pair"
    shutil.copytree(workdir, alone)
    shutil.copytree(workdir, pair)
    args = [stage, "--model", str(tiny_model_dir), *STAGES[stage], *COMMON]

    code, out, err = run_cli(*args, "--workdir", alone)
    assert code == 0, err
    single = json.loads(Path(last_json(out)["path"], "manifest.json").read_text())

    done = torchrun(*args, "--workdir", str(pair))
    assert done.returncode == 0, done.stderr[-3000:]
    root = pair / "checkpoints" / stage
    versions = [p for p in root.iterdir() if p.is_dir()]
    assert [p.name for p in versions] == [single["version"]], versions  # one artifact, no .partial left
    manifest = json.loads((versions[0] / "manifest.json").read_text())
    metrics = [json.loads(line) for line in (versions[0] / "metrics.jsonl").read_text().splitlines()]

    assert (single["world_size"], manifest["world_size"]) == (1, 2)
    assert manifest["counts"]["steps"] == single["counts"]["steps"] == STEPS[stage]
    assert len([m for m in metrics if "loss" in m]) == STEPS[stage]  # logged once, by rank 0
    # both ranks print the committed artifact (rank 1 after waiting for rank 0's commit)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"')]
    assert len(results) == 2 and {r["path"] for r in results} == {str(versions[0])}
