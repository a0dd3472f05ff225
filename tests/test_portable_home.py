"""A LOOPER_HOME moved elsewhere works for every stage (manifests hold home-relative paths and
inputs are found by version); the same inputs and options give the same versions and hashes in
two homes and two processes (PEFT's target_modules set written sorted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import last_json

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "looper:tiny"]
SFT = [*TINY, "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--no-gradient-checkpointing"]
SFT += ["--dev-limit", "2", "--save-steps", "1", "--learning-rate", "1e-3"]
ROLLOUTS = [
    *TINY,
    "--limit",
    "2",
    "--arms",
    "4",
    "--max-new-tokens",
    "6",
    "--backend",
    "hf",
    "--shard-size",
    "1",
]
TRAIN = [*TINY, "--max-steps", "1", "--no-gradient-checkpointing", "--learning-rate", "1e-3"]


def graded_rollouts(home: Path) -> str:
    """The latest rollouts copied with arm 0 of each question right, so dpo has pairs (the tiny
    model never answers right), committed through the Store like any artifact."""
    from looper.rewards.summary import ROW_SCHEMA
    from looper.store.artifacts import Store, read_rows, write_parquet

    store = Store(home)
    source = store.resolve("rollouts")
    run = store.begin("rollouts", "graded")
    for shard in sorted(source.path.glob("shard-*.parquet")):
        rows = read_rows(shard)
        for row in rows:
            row["arm_outputs"][0]["correct"] = True
            row["arm_rewards"] = [1.0] + [-1.0] * (len(row["arm_rewards"]) - 1)
        write_parquet(run.path / shard.name, rows, ROW_SCHEMA)
    m = source.manifest
    run.commit(
        config=m["config"],
        inputs={name: store.find(name, ref["version"]) for name, ref in m["inputs"].items()},
        identity=m["identity"] | {"graded": True},
        extra={k: m[k] for k in ("base_model", "policy", "generated_by")},
    )
    return "graded"


@pytest.mark.slow
def test_moved_home_works_for_every_stage(run_cli, tmp_path):
    home = tmp_path / "box-a" / "home"

    def looper(*args):
        code, out, err = run_cli(*map(str, args), "--workdir", where, "--json")
        assert code == 0, err
        return last_json(out)

    where = home
    looper("prepare", "--source", "synthetic", "--synthetic-train", "10", "--synthetic-test", "4")
    looper("sft", *SFT)
    rollouts = looper("rollouts", *ROLLOUTS)
    graded_rollouts(home)

    where = tmp_path / "box-b" / "moved"
    where.parent.mkdir()
    os.rename(home, where)
    for manifest in where.rglob("manifest.json"):  # no path of the old home is recorded anywhere
        assert str(home) not in manifest.read_text(), manifest
    assert looper("rollouts", *ROLLOUTS)["skipped"]  # same version found in the moved home
    ppo = looper(
        "ppo",
        *TRAIN,
        "--rollouts",
        rollouts["version"],
        "--questions-per-step",
        "2",
        "--questions-per-minibatch",
        "1",
    )
    dpo = looper("dpo", *TRAIN, "--rollouts", "graded", "--batch-size", "1", "--grad-accum", "1")
    looper(
        "eval",
        *TINY,
        "--compare",
        "base,sft,ppo,dpo",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--backend",
        "hf",
        "--bootstrap",
        "10",
    )
    ppo_manifest = json.loads((Path(ppo["path"]) / "manifest.json").read_text())
    assert ppo_manifest["reference"].startswith("checkpoints/sft/")  # the rollouts' adapter, home-relative
    assert ppo_manifest["inputs"]["rollouts"]["path"] == f"data/rollouts/{rollouts['version']}"
    assert not Path(dpo["path"]).is_relative_to(home)


def cli(home: Path, *args: str, hash_seed: str) -> dict:
    """The CLI in a fresh process with its own PYTHONHASHSEED: set iteration order differs between them."""
    env = dict(
        os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1", LOOPER_HOME=str(home)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "looper", *args, "--json"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_same_inputs_same_versions_and_hashes_in_two_homes(tmp_path):
    results = {}
    for home, hash_seed in ((tmp_path / "one", "1"), (tmp_path / "two", "2")):
        prepare = cli(
            home,
            "prepare",
            "--source",
            "synthetic",
            "--synthetic-train",
            "10",
            "--synthetic-test",
            "4",
            hash_seed=hash_seed,
        )
        sft = cli(home, "sft", *SFT, hash_seed=hash_seed)
        rollouts = cli(home, "rollouts", *ROLLOUTS, hash_seed=hash_seed)
        results[home.name] = [
            (r["version"], json.loads((Path(r["path"]) / "manifest.json").read_text())["hash"])
            for r in (prepare, sft, rollouts)
        ]
        adapter_config = json.loads((Path(sft["path"]) / "adapter_config.json").read_text())
        assert adapter_config["target_modules"] == sorted(adapter_config["target_modules"])
    assert results["one"] == results["two"]
