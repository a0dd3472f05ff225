"""GSM8K-shaped test sets from anywhere (`looper.data.sources`), offline: a local `datasets`
directory shaped like GSM8K-Platinum (columns question, answer, cleaning_status; a test split
only) through `looper eval --source hub:DIR` and `looper prepare --extra-eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import last_json, make_rows, write_gsm8k

FAST = ["--max-new-tokens", "4", "--bootstrap", "50", "--json", "--compare", "base"]


def platinum_dir(path: Path, rows: list[dict]) -> Path:
    """A `datasets` save_to_disk directory like madrylab/gsm8k-platinum: DatasetDict, test split only."""
    from datasets import Dataset, DatasetDict

    columns = {k: [r[k] for r in rows] for k in ("question", "answer", "cleaning_status")}
    DatasetDict({"test": Dataset.from_dict(columns)}).save_to_disk(str(path))
    return path


def platinum_rows(n: int, start: int = 5000) -> list[dict]:
    statuses = ("consensus", "verified", "revised")
    return [r | {"cleaning_status": statuses[i % 3]} for i, r in enumerate(make_rows(n, start=start))]


@pytest.fixture
def prepared(run_cli, gsm8k_dir, tmp_path) -> Path:
    workdir = tmp_path / "w"
    code, _, err = run_cli("prepare", "--source", gsm8k_dir, "--workdir", workdir)
    assert code == 0, err
    return workdir


def test_parse_specs(tmp_path):
    from looper.data.sources import parse
    from looper.errors import LooperError

    assert parse("hub:madrylab/gsm8k-platinum") == ("madrylab/gsm8k-platinum", None, None)
    assert parse("hub:openai/gsm8k:main@train") == ("openai/gsm8k", "main", "train")
    assert parse("hub:openai/gsm8k@dev") == ("openai/gsm8k", None, "dev")
    assert parse(f"{tmp_path}@validation") == (str(tmp_path), None, "validation")
    assert parse(str(tmp_path)) == (str(tmp_path), None, None)
    with pytest.raises(LooperError, match="expected hub:<dataset>"):
        parse("hub:openai/gsm8k:@test")


def test_platinum_shaped_dir_through_eval(run_cli, prepared, tiny_model_dir, tmp_path):
    from looper.store.artifacts import Store, read_rows

    train = read_rows(Store(prepared).resolve("prepare").path / "train.parquet")
    rows = platinum_rows(4)
    rows[1] = {
        "question": train[0]["question"],
        "answer": train[0]["solution"],
        "cleaning_status": "consensus",
    }
    rows.append({"question": "A malformed row.", "answer": "no final line", "cleaning_status": "revised"})
    source = platinum_dir(tmp_path / "gsm8k-platinum", rows)
    args = ["eval", "--model", tiny_model_dir, "--workdir", prepared, "--source", f"hub:{source}", *FAST]

    code, out, err = run_cli(*args)
    assert code == 1 and f"hub:{source}[test] row 4: no '#### <answer>' line" in err and "--skip-bad" in err
    assert len(err.strip().splitlines()) == 1
    assert not list((prepared / "data" / "eval").glob("*/manifest.json"))  # nothing half-written

    code, out, err = run_cli(*args, "--skip-bad")
    assert code == 0, err
    assert "warning: 1 of 4 questions" in err  # the overlap check runs on hub sets too
    result = last_json(out)
    assert result["counts"].items() >= {"questions": 4, "skipped_bad": 1, "overlap_with_training": 1}.items()
    path = Path(result["path"])
    manifest = json.loads((path / "manifest.json").read_text())
    about = manifest["questions"]
    assert about["dataset"] == "gsm8k-platinum" and about["overlap_ids"] == ["gsm8k-platinum-00001"]
    assert about["source"]["cleaning_status"] == {"consensus": 3, "revised": 2}
    assert about["source"]["split"] == "test" and about["source"]["rows"] == 4
    assert about["bad_rows"] == [f"hub:{source}[test] row 4: no '#### <answer>' line"]
    completions = read_rows(path / "completions.parquet")
    assert [r["id"] for r in completions] == [f"gsm8k-platinum-{i:05d}" for i in range(4)]
    assert completions[0]["gold_answer"] == "5002" and completions[0]["question"] == rows[0]["question"]

    # the report and its plots name the set they ran on
    assert (path / "report.md").read_text().splitlines()[0].endswith(": gsm8k-platinum")
    assert json.loads((path / "report.json").read_text())["settings"]["dataset"] == "gsm8k-platinum"
    from PIL import Image

    assert Image.open(path / "accuracy.png").text["Title"] == "gsm8k-platinum accuracy, 4 questions"
    assert Image.open(path / "lengths.png").text["Title"] == "Completion lengths, gsm8k-platinum"

    # the same directory without the hub: prefix, and as a Parquet file, give the same questions
    code, out, err = run_cli(*args[: -len(FAST) - 2], "--source", f"{source}@test", "--skip-bad", *FAST)
    assert code == 0, err
    assert last_json(out)["counts"]["questions"] == 4
    parquet = tmp_path / "plat.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[:3]), parquet)
    code, out, err = run_cli(*args[: -len(FAST) - 2], "--source", parquet, *FAST)
    assert code == 0, err
    assert (
        json.loads((Path(last_json(out)["path"]) / "report.json").read_text())["settings"]["dataset"]
        == "plat"
    )


def test_eval_report_names_a_prepare_split(run_cli, tiny_model_dir, tmp_path):
    code, _, err = run_cli(
        "prepare",
        "--source",
        "synthetic",
        "--synthetic-train",
        "20",
        "--synthetic-test",
        "3",
        "--workdir",
        tmp_path,
    )
    assert code == 0, err
    code, out, err = run_cli("eval", "--model", tiny_model_dir, "--workdir", tmp_path, *FAST)
    assert code == 0, err
    path = Path(last_json(out)["path"])
    from PIL import Image

    assert Image.open(path / "accuracy.png").text["Title"] == "synthetic test accuracy, 3 questions"
    assert "GSM8K" not in (path / "report.md").read_text()


def test_bad_sources_are_one_line_errors(run_cli, prepared, tiny_model_dir, tmp_path):
    base = ["eval", "--model", tiny_model_dir, "--workdir", prepared, *FAST]
    code, _, err = run_cli(*base, "--source", tmp_path / "missing.jsonl")
    assert code == 1 and "no such file or directory" in err
    source = platinum_dir(tmp_path / "plat", platinum_rows(2))
    code, _, err = run_cli(*base, "--source", f"hub:{source}@train")
    assert code == 1 and "no split 'train' (has test)" in err
    from datasets import Dataset

    Dataset.from_dict({"problem": ["x"], "solution": ["#### 1"]}).save_to_disk(str(tmp_path / "other"))
    code, _, err = run_cli(*base, "--source", tmp_path / "other")
    assert code == 1 and "no 'question' or 'answer' column (has problem, solution)" in err
    code, _, err = run_cli(*base, "--split", "gsm8k-platinum")
    assert (
        code == 1
        and "has no such split (it has dev, test; add one with `looper prepare --extra-eval`)" in err
    )
    code, _, err = run_cli(*base, "--split", "train")
    assert code == 1 and "--split train" in err


def test_prepare_extra_eval_split(run_cli, gsm8k_dir, tiny_model_dir, tmp_path):
    from looper.store.artifacts import Store, read_rows

    rows = platinum_rows(5) + [{"question": "Bad.", "answer": "", "cleaning_status": "revised"}]
    source = platinum_dir(tmp_path / "gsm8k-platinum", rows)
    workdir = tmp_path / "w"
    args = ["prepare", "--source", gsm8k_dir, "--workdir", workdir, "--extra-eval", f"hub:{source}", "--json"]
    code, _, err = run_cli(*args)
    assert code == 1 and "row 5: missing 'answer'" in err
    code, out, err = run_cli(*args, "--skip-bad")
    assert code == 0, err
    result = last_json(out)
    assert (
        result["counts"].items()
        >= {
            "train": 40,
            "dev": 10,
            "test": 10,
            "gsm8k-platinum": 5,
            "skipped_bad": 1,
        }.items()
    )
    prepare = Store(workdir).resolve("prepare")
    plat = read_rows(prepare.path / "gsm8k-platinum.parquet")
    assert [r["id"] for r in plat][:2] == ["gsm8k-platinum-test-00000", "gsm8k-platinum-test-00001"]
    assert {r["split"] for r in plat} == {"gsm8k-platinum"} and plat[0]["gold_answer"] == "5002"
    assert prepare.manifest["extra_eval"]["gsm8k-platinum"]["cleaning_status"]["revised"] == 2

    code, out, err = run_cli(
        "eval", "--model", tiny_model_dir, "--workdir", workdir, "--split", "gsm8k-platinum", *FAST
    )
    assert code == 0, err
    assert last_json(out)["counts"]["questions"] == 5
    report = json.loads((Path(last_json(out)["path"]) / "report.json").read_text())
    assert report["settings"]["dataset"] == "gsm8k-platinum"
    code, _, err = run_cli(
        "rollouts", "--model", tiny_model_dir, "--workdir", workdir, "--split", "gsm8k-platinum"
    )
    assert code == 1 and "never read the test split or an evaluation split" in err

    # an evaluation set that repeats a train question is refused, like a leaked test question
    train_row = make_rows(1)[0] | {"cleaning_status": "consensus"}
    leaky = platinum_dir(tmp_path / "leaky", platinum_rows(2) + [train_row])
    code, _, err = run_cli(
        "prepare", "--source", gsm8k_dir, "--workdir", tmp_path / "w2", "--extra-eval", f"plat={leaky}"
    )
    assert code == 1 and "1 plat question(s) also appear in train/dev" in err
    code, _, err = run_cli(
        "prepare", "--source", gsm8k_dir, "--workdir", tmp_path / "w2", "--extra-eval", f"test={source}"
    )
    assert code == 1 and "split name 'test' is taken" in err


def test_single_jsonl_source_skip_bad(run_cli, prepared, tiny_model_dir, tmp_path):
    source = write_gsm8k(tmp_path / "extra.jsonl", [*make_rows(2, start=7000), "{not json"])
    base = ["eval", "--model", tiny_model_dir, "--workdir", prepared, "--source", source, *FAST]
    code, _, err = run_cli(*base)
    assert code == 1 and f"{source}:3: invalid JSON" in err
    code, out, err = run_cli(*base, "--skip-bad")
    assert code == 0, err
    assert last_json(out)["counts"]["skipped_bad"] == 1


def test_prepare_from_a_datasets_dir_with_train_and_test(run_cli, tmp_path):
    """The offline fallback for `--source hub`: openai/gsm8k saved with save_to_disk on another box."""
    from datasets import Dataset, DatasetDict

    from looper.store.artifacts import Store, read_rows

    as_ds = lambda rows: Dataset.from_dict({k: [r[k] for r in rows] for k in ("question", "answer")})  # noqa: E731
    saved = tmp_path / "gsm8k"
    DatasetDict({"train": as_ds(make_rows(20)), "test": as_ds(make_rows(4, start=900))}).save_to_disk(
        str(saved)
    )
    code, out, err = run_cli("prepare", "--source", saved, "--workdir", tmp_path / "w", "--json")
    assert code == 0, err
    assert last_json(out)["counts"].items() >= {"train": 16, "dev": 4, "test": 4}.items()
    test = read_rows(Store(tmp_path / "w").resolve("prepare").path / "test.parquet")
    assert test[0]["id"] == "gsm8k-test-00000" and test[0]["gold_answer"] == "902"


def test_hub_repo_layout_through_load_dataset(run_cli, prepared, tiny_model_dir, tmp_path, monkeypatch):
    """A local copy of the hub repo madrylab/gsm8k-platinum (its README's `configs` and
    main/test-*.parquet), read by `datasets.load_dataset` exactly as the hub id would be."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    repo = tmp_path / "gsm8k-platinum"
    (repo / "main").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(platinum_rows(3)), repo / "main" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: test\n    path: main/test-*\n---\n"
    )
    code, out, err = run_cli(
        "eval", "--model", tiny_model_dir, "--workdir", prepared, "--source", f"hub:{repo}:main", *FAST
    )
    assert code == 0, err
    manifest = json.loads((Path(last_json(out)["path"]) / "manifest.json").read_text())
    assert (
        manifest["questions"]["source"]["config"] == "main" and manifest["questions"]["source"]["rows"] == 3
    )
    assert manifest["counts"]["questions"] == 3
    code, _, err = run_cli(
        "eval", "--model", tiny_model_dir, "--workdir", prepared, "--source", f"hub:{repo}:nope", *FAST
    )
    assert code == 1 and "could not load it with datasets" in err and len(err.strip().splitlines()) == 1
