"""`looper prepare` through the real CLI on small files it makes itself (and the shared GSM8K copy)."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest
from conftest import SHARED_GSM8K, last_json, make_rows, write_gsm8k

from looper.data.gsm8k import clean_solution, normalize_gold


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_local_dir_counts_schema_and_skip(run_cli, gsm8k_dir, tmp_path):
    code, out, err = run_cli("prepare", "--source", gsm8k_dir, "--workdir", tmp_path / "w", "--json")
    assert code == 0, err
    result = last_json(out)
    assert result["stage"] == "prepare" and not result["skipped"]
    assert result["counts"] == {"train": 40, "dev": 10, "test": 10, "skipped_bad": 0}
    table = pq.read_table(f"{result['path']}/train.parquet")
    assert table.column_names == ["id", "question", "gold_answer", "solution", "prompt", "split", "source"]
    row = table.to_pylist()[0]
    assert row["prompt"][0]["role"] == "user" and row["question"] in row["prompt"][0]["content"]
    assert "<<" not in row["solution"] and row["solution"].endswith(f"#### {row['gold_answer']}")
    manifest = json.loads(open(f"{result['path']}/manifest.json").read())
    assert manifest["counts"]["train"] == 40 and manifest["config"]["seed"] == 0

    code, out, _ = run_cli("prepare", "--source", gsm8k_dir, "--workdir", tmp_path / "w", "--json")
    again = last_json(out)
    assert code == 0 and again["skipped"] and again["version"] == result["version"]

    code, out, _ = run_cli(
        "prepare", "--source", gsm8k_dir, "--workdir", tmp_path / "w", "--seed", "1", "--json"
    )
    assert code == 0 and last_json(out)["version"] != result["version"]


def test_same_seed_gives_byte_identical_splits(run_cli, gsm8k_dir, tmp_path):
    paths = []
    for name in ("a", "b"):
        _, out, _ = run_cli("prepare", "--source", gsm8k_dir, "--workdir", tmp_path / name, "--json")
        paths.append(last_json(out)["path"])
    for split in ("train", "dev", "test"):
        a, b = (tmp_path / p / f"{split}.parquet" for p in paths)
        assert digest(a) == digest(b)
    dev_ids = {r["id"] for r in pq.read_table(f"{paths[0]}/dev.parquet").to_pylist()}
    train_ids = {r["id"] for r in pq.read_table(f"{paths[0]}/train.parquet").to_pylist()}
    assert not dev_ids & train_ids and len(dev_ids | train_ids) == 50


def test_changed_source_gives_new_version(run_cli, gsm8k_dir, tmp_path):
    _, out, _ = run_cli("prepare", "--source", gsm8k_dir, "--workdir", tmp_path, "--json")
    write_gsm8k(gsm8k_dir / "train.jsonl", make_rows(51))
    _, out2, _ = run_cli("prepare", "--source", gsm8k_dir, "--workdir", tmp_path, "--json")
    assert last_json(out)["version"] != last_json(out2)["version"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "train.jsonl:3: invalid JSON"),
        (json.dumps({"answer": "#### 3"}), "train.jsonl:3: missing 'question'"),
        (json.dumps({"question": "Q?"}), "train.jsonl:3: missing 'answer'"),
        (json.dumps({"question": "Q?", "answer": "no marker"}), "train.jsonl:3: no '#### <answer>' line"),
        (
            json.dumps({"question": "Q?", "answer": "#### many"}),
            "train.jsonl:3: gold answer 'many' is not a number",
        ),
        ("[1, 2]", "train.jsonl:3: not a JSON object"),
    ],
)
def test_bad_rows_stop_with_file_and_line(run_cli, gsm8k_dir, tmp_path, bad_line, message):
    rows = make_rows(50)
    write_gsm8k(gsm8k_dir / "train.jsonl", rows[:2] + [bad_line] + rows[2:])
    code, out, err = run_cli("prepare", "--source", gsm8k_dir, "--workdir", tmp_path / "w")
    assert code == 1 and message in err and "--skip-bad" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "w" / "data" / "prepare").exists()  # nothing half-written

    code, out, err = run_cli(
        "prepare", "--source", gsm8k_dir, "--workdir", tmp_path / "w", "--skip-bad", "--json"
    )
    assert code == 0, err
    counts = last_json(out)["counts"]
    assert counts["skipped_bad"] == 1 and counts["train"] + counts["dev"] == 50


def test_test_question_in_train_fails_loudly(run_cli, gsm8k_dir, tmp_path):
    leaked = dict(make_rows(1, start=1000)[0])
    leaked["question"] = "  " + leaked["question"].upper().replace("?", " ?")  # same after folding
    write_gsm8k(gsm8k_dir / "train.jsonl", make_rows(50) + [leaked])
    code, _, err = run_cli("prepare", "--source", gsm8k_dir, "--workdir", tmp_path)
    assert code == 1 and "1 test question(s) also appear in train/dev" in err


def test_single_file_source_and_missing_source(run_cli, gsm8k_dir, tmp_path):
    code, out, _ = run_cli("prepare", "--source", gsm8k_dir / "train.jsonl", "--workdir", tmp_path, "--json")
    assert code == 0 and last_json(out)["counts"]["test"] == 0
    code, _, err = run_cli("prepare", "--source", tmp_path / "nope", "--workdir", tmp_path)
    assert code == 1 and "not 'hub', 'synthetic', hub:<dataset>[:<config>], or an existing" in err


def test_synthetic_source_offline(run_cli, tmp_path):
    code, out, err = run_cli(
        "prepare",
        "--source",
        "synthetic",
        "--synthetic-train",
        "100",
        "--synthetic-test",
        "20",
        "--workdir",
        tmp_path,
        "--json",
    )
    assert code == 0, err
    assert last_json(out)["counts"] == {"train": 80, "dev": 20, "test": 20, "skipped_bad": 0}


def test_gold_normalisation_and_solution_cleaning():
    assert normalize_gold("x\n#### 1,000") == "1000"
    assert normalize_gold("#### -3") == "-3"
    assert normalize_gold("#### $18") == "18"
    assert normalize_gold("#### 2.50") == "2.5"
    assert clean_solution("48/2 = <<48/2=24>>24 clips\n#### 24") == "48/2 = 24 clips\n#### 24"


@pytest.mark.skipif(not SHARED_GSM8K.is_dir(), reason="shared GSM8K copy not beside the checkout")
def test_prepare_real_gsm8k(run_cli, tmp_path):
    code, out, err = run_cli("prepare", "--source", SHARED_GSM8K, "--workdir", tmp_path, "--json")
    assert code == 0, err
    assert last_json(out)["counts"] == {"train": 5978, "dev": 1495, "test": 1319, "skipped_bad": 0}
