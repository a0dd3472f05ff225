"""What the fault-injection suite shares: the real `looper` CLI in a subprocess (so SIGKILL kills
a whole run, as a dead box would), homes copied from one reference home, and comparisons of a
rerun's artifact with the uninterrupted one (rows for data stages, weights for training stages).

The reference home is built once per session by uninterrupted runs of every stage with
tests/faults/faults.toml; a scenario copies it, removes the stage under test, and reruns that
stage with `LOOPER_FAULT=<point>:<n>` (looper/store/faults.py) and then without.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIPELINE = Path(__file__).with_name("faults.toml")
DATA_STAGES = ("prepare", "rollouts", "eval")
TRAIN_STAGES = ("sft", "ppo", "dpo")
# The rollouts the tiny model writes are all wrong (it is random): ppo and dpo learn from a copy
# where arm 0 of each question is marked right, so they have pairs and non-zero advantages.
GRADED = "graded000000"
STAGE_ARGS = {"ppo": ["--rollouts", GRADED], "dpo": ["--rollouts", GRADED]}
TIMEOUT = 300


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def killed(self) -> bool:
        return self.code == -signal.SIGKILL

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def env_for(home: Path, fault: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LOOPER_HOME=str(home),
        PYTHONPATH=str(REPO),  # this checkout's looper, not the one the venv has installed
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    for name in ("LOOPER_FAULT", "LOOPER_CONFIG", "LOOPER_KILL_AT", "LOOPER_KILL_LOG"):
        env.pop(name, None)
    if fault:
        env["LOOPER_FAULT"] = fault
    return env | (extra or {})


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "looper", "--config", str(PIPELINE), *map(str, args)]


def wait_while_paused() -> None:
    """With LOOPER_FAULTS_PAUSE=<path>, start no run while that path exists (a shared box's
    quiet-period marker: the hours-long kill-point set then waits instead of disturbing a benchmark)."""
    import time

    pause = os.environ.get("LOOPER_FAULTS_PAUSE")
    while pause and os.path.exists(pause):
        time.sleep(30)


def looper(
    home: Path, *args: str, fault: str | None = None, timeout: int = TIMEOUT, env: dict | None = None
) -> Result:
    """Run `looper --config faults.toml ARGS` against `home`; returns code (-9 when killed), stdout, stderr.
    `env`: more variables (LOOPER_KILL_AT, LOOPER_KILL_LOG: looper/store/faults.py)."""
    wait_while_paused()
    proc = subprocess.run(
        command(*args), env=env_for(home, fault, env), capture_output=True, text=True, timeout=timeout
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def start(home: Path, *args: str) -> subprocess.Popen:
    """A run in the background (races)."""
    return subprocess.Popen(
        command(*args), env=env_for(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> Result:
    out, err = proc.communicate(timeout=TIMEOUT)
    return Result(proc.returncode, out, err)


def stage_root(home: Path, stage: str) -> Path:
    return home / ("checkpoints" if stage in TRAIN_STAGES else "data") / stage


def latest(home: Path, stage: str) -> str:
    return (stage_root(home, stage) / "LATEST").read_text().strip()


def copy_without(reference: Path, dest: Path, stage: str) -> Path:
    """A copy of the reference home without `stage`'s artifacts (its inputs kept)."""
    shutil.copytree(reference, dest, symlinks=True)
    shutil.rmtree(stage_root(dest, stage))
    return dest


def manifest(home: Path, stage: str, version: str | None = None) -> dict:
    import json

    return json.loads(
        (stage_root(home, stage) / (version or latest(home, stage)) / "manifest.json").read_text()
    )


def tree(home: Path) -> dict[str, int]:
    """Every file and directory under `home` with its size: what 'nothing left behind' compares."""
    return {
        str(p.relative_to(home)): (p.stat().st_size if p.is_file() else -1)
        for p in sorted(home.rglob("*"))
        if not p.is_symlink()
    }


# --------------------------------------------------------------------------- comparisons


def row_key(stage: str, row: dict) -> tuple:
    if stage == "eval":
        return (row["model"], row["id"], row["sample"])
    if stage == "prepare":
        return (row["split"], row["id"])
    return (row["id"],)


def table_rows(path: Path) -> list[dict]:
    from looper.store.artifacts import read_rows

    return [r for f in sorted(path.glob("*.parquet")) for r in read_rows(f)]


def compare_rows(stage: str, reference: Path, got: Path) -> tuple[int, int, bool]:
    """(rows lost, rows doubled, all rows equal) of artifact dir `got` against `reference`."""
    want = {row_key(stage, r): r for r in table_rows(reference)}
    rows = table_rows(got)
    keys = [row_key(stage, r) for r in rows]
    lost = len(set(want) - set(keys))
    doubled = len(keys) - len(set(keys))
    same = lost == 0 and doubled == 0 and all(want.get(row_key(stage, r)) == r for r in rows)
    return lost, doubled, same


def same_weights(reference: Path, got: Path) -> bool:
    """The two adapters' tensors are bit-identical."""
    import torch
    from safetensors.torch import load_file

    a = load_file(reference / "adapter_model.safetensors")
    b = load_file(got / "adapter_model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(result: Result) -> bool:
    """Failed with a single line on stderr (no traceback, no usage box)."""
    lines = result.error_lines()
    return result.code not in (0, -signal.SIGKILL) and len(lines) == 1 and "Traceback" not in result.err


def grade_rollouts(home: Path) -> str:
    """Commit a copy of the latest rollouts with arm 0 of each question right (reward 1) as
    version GRADED, with the same inputs, base and policy (see GRADED)."""
    import json

    from looper.rewards.summary import ROW_SCHEMA
    from looper.store.artifacts import Artifact, Store, read_rows, write_parquet

    store = Store(home)
    source = store.resolve("rollouts")
    run = store.begin("rollouts", GRADED)
    for shard in sorted(source.path.glob("shard-*.parquet")):
        rows = read_rows(shard)
        for row in rows:
            row["arm_outputs"][0]["correct"] = True
            row["arm_rewards"] = [1.0] + [min(r, 0.0) - 0.5 for r in row["arm_rewards"][1:]]
        write_parquet(run.path / shard.name, rows, ROW_SCHEMA)
    m = source.manifest
    inputs = {name: store.find(name, ref["version"]) for name, ref in m["inputs"].items()}
    extra = {k: m[k] for k in ("base_model", "policy", "generated_by", "sampling", "shard")}
    run.commit(
        config=m["config"],
        inputs={k: v for k, v in inputs.items() if isinstance(v, Artifact)},
        identity=m["identity"] | {"graded": True},
        counts=m["counts"],
        metrics=json.loads(json.dumps(m["metrics"])),
        extra=extra,
    )
    return GRADED
