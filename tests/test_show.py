"""`looper show`: every stage's rows through the real CLI, round-tripped against what pyarrow reads."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_rows, write_gsm8k

from looper.store.artifacts import Store, read_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir) -> Path:
    """prepare (with an extra evaluation split), rollouts, eval and a 2-step sft, all on the tiny model."""
    from looper.config import EvalConfig, PrepareConfig, RolloutsConfig, SftConfig
    from looper.stages import evaluate, prepare, rollouts, sft

    workdir = tmp_path_factory.mktemp("show")
    extra = write_gsm8k(workdir / "extra.jsonl", make_rows(3, start=4000))
    common = {"workdir": str(workdir)}
    prepare.run(
        PrepareConfig(
            source="synthetic", synthetic_train=20, synthetic_test=4, extra_eval=str(extra), **common
        )
    )
    model = {"model": str(tiny_model_dir), **common}
    rollouts.run(
        RolloutsConfig(policy="base", arms=2, max_new_tokens=6, batch_size=8, limit=3, shard_size=2, **model)
    )
    evaluate.run(EvalConfig(compare="base", max_new_tokens=4, bootstrap=50, limit=3, **model))
    sft.run(
        SftConfig(
            max_steps=2,
            limit=4,
            batch_size=2,
            grad_accum=1,
            dev_limit=0,
            save_steps=100,
            gradient_checkpointing=False,
            **model,
        )
    )
    return workdir


def expected_rows(home: Path, stage: str) -> list[dict]:
    """The artifact's rows read independently of looper.store.show."""
    kind = "checkpoints" if stage == "sft" else "data"
    art = Store(home).resolve(stage)
    assert art.path.parent.parent.name == kind
    if stage == "prepare":
        return [
            r for split in ("train", "dev", "test", "extra") for r in read_rows(art.path / f"{split}.parquet")
        ]
    if stage == "rollouts":
        shards = sorted(art.path.glob("shard-*.parquet"))
        assert len(shards) == 2  # rows come from every shard, in order
        return [r for f in shards for r in read_rows(f)]
    if stage == "eval":
        return read_rows(art.path / "completions.parquet")
    return [json.loads(line) for line in (art.path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["prepare", "rollouts", "eval", "sft"])
def test_jsonl_round_trips_every_stage(run_cli, home, stage):
    code, out, err = run_cli("show", stage, "--workdir", home, "--format", "jsonl")
    assert code == 0, err
    shown = [json.loads(line) for line in out.splitlines()]
    expected = expected_rows(home, stage)
    assert shown == expected and len(shown) > 1
    version = Store(home).resolve(stage).version
    code, out, _ = run_cli("show", stage, version, "--workdir", home, "--format", "jsonl", "--limit", "1")
    assert code == 0 and [json.loads(line) for line in out.splitlines()] == expected[:1]


def test_rollouts_rows_carry_the_nested_arm_outputs(run_cli, home):
    code, out, err = run_cli("show", "rollouts", "--workdir", home, "--limit", "1")  # piped: jsonl
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    arm = row["arm_outputs"][0]
    assert len(row["arm_outputs"]) == 2 and len(arm["logprobs"]) == len(arm["token_ids"]) > 0
    assert {"s_end", "s_wm", "reward", "arm_rewards", "cf_outputs"} <= set(row)


def test_columns_csv_and_question(run_cli, home):
    code, out, err = run_cli(
        "show", "eval", "--workdir", home, "--format", "csv", "--columns", "id,correct,tokens"
    )
    assert code == 0, err
    table = list(csv.reader(io.StringIO(out)))
    rows = read_rows(Store(home).resolve("eval").path / "completions.parquet")
    assert table[0] == ["id", "correct", "tokens"] and len(table) == len(rows) + 1
    assert table[1] == [rows[0]["id"], str(rows[0]["correct"]).lower(), str(rows[0]["tokens"])]

    code, out, _ = run_cli("show", "prepare", "--workdir", home, "--format", "csv", "--limit", "2")
    first = list(csv.DictReader(io.StringIO(out)))[0]
    assert (
        json.loads(first["prompt"])
        == read_rows(Store(home).resolve("prepare").path / "train.parquet")[0]["prompt"]
    )

    wanted = rows[1]["id"]
    code, out, _ = run_cli("show", "eval", "--workdir", home, "--format", "jsonl", "--question", wanted)
    assert [json.loads(line) for line in out.splitlines()] == [r for r in rows if r["id"] == wanted]


def test_question_side_by_side_and_table(run_cli, home):
    row = read_rows(sorted((Store(home).resolve("rollouts").path).glob("shard-*.parquet"))[0])[1]
    code, out, err = run_cli(
        "show", "rollouts", "--workdir", home, "--format", "table", "--question", row["id"]
    )
    assert code == 0, err
    arms = row["arm_outputs"]
    assert row["id"] in out and f"gold {row['gold_answer']}" in out and f"s_wm {row['s_wm']:.3f}" in out
    header = next(line for line in out.splitlines() if arms[0]["arm"] in line)
    assert arms[1]["arm"] in header  # the arms are columns, side by side
    reward_line = next(line for line in out.splitlines() if line.strip("│┃ ").startswith("reward"))
    assert all(f"{r:.3f}" in reward_line for r in row["arm_rewards"])

    code, out, err = run_cli(
        "show", "eval", "--workdir", home, "--format", "table", "--columns", "id,model,correct"
    )
    assert code == 0, err
    assert "eval " in out and "3 row(s) shown" in out and "base" in out


def test_show_errors(run_cli, home):
    code, _, err = run_cli("show", "nope", "--workdir", home)
    assert code == 1 and "no such stage" in err
    code, _, err = run_cli("show", "eval", "--workdir", home, "--columns", "id,colour")
    assert code == 1 and "no column colour in eval (has id, model," in err
    code, _, err = run_cli("show", "eval", "--workdir", home, "--format", "xml")
    assert code == 1 and "--format xml: choose one of jsonl, csv, table" in err
    code, _, err = run_cli("show", "ppo", "--workdir", home)
    assert code == 1 and "ppo" in err and len(err.strip().splitlines()) == 1


def test_piped_into_head(home):
    """`looper show rollouts --format jsonl | head -1`: one JSON object, and no broken-pipe noise."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = f"{sys.executable} -m looper show rollouts --workdir {home} --format jsonl | head -1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 and isinstance(json.loads(done.stdout), dict)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_loop_shows_its_rounds(run_cli, tmp_path):
    """A loop artifact's rows are the rounds of its rounds.json record."""
    from looper.store.artifacts import atomic_write_bytes, dumps_json

    rounds = [
        {"round": 1, "dev": {"accuracy": 0.25}, "kl": 0.01},
        {"round": 2, "dev": {"accuracy": 0.5}, "kl": 0.02},
    ]
    run = Store(tmp_path).begin("loop", "hand0")
    atomic_write_bytes(run.path / "rounds.json", dumps_json({"rounds": rounds, "current": None}))
    run.commit(config={}, inputs={}, identity={})
    code, out, err = run_cli("show", "loop", "--workdir", tmp_path, "--format", "jsonl")
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == rounds
    code, out, _ = run_cli("show", "loop", "--workdir", tmp_path, "--format", "csv", "--columns", "round,kl")
    assert out.splitlines() == ["round,kl", "1,0.01", "2,0.02"]
