"""`looper eval`: the tiny model (and a 2-step sft adapter) through the real CLI, plus the
pure parts (lm-eval conventions, the report statistics) on hand-written data."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import last_json, make_rows, write_gsm8k

from looper.data import lm_eval_format as lm

FAST = ["--max-new-tokens", "8", "--bootstrap", "200", "--json"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A work dir with a synthetic prepare artifact (12 test questions) and a 2-step sft adapter."""
    from looper.config import PrepareConfig, SftConfig
    from looper.stages import prepare, sft

    workdir = tmp_path_factory.mktemp("eval-work")
    prepare.run(
        PrepareConfig(source="synthetic", synthetic_train=40, synthetic_test=12, workdir=str(workdir))
    )
    sft.run(
        SftConfig(
            model=str(tiny_model_dir),
            workdir=str(workdir),
            max_steps=2,
            limit=8,
            batch_size=4,
            grad_accum=1,
            dev_limit=0,
            save_steps=100,
            learning_rate=1e-2,
            gradient_checkpointing=False,
        )
    )
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def eval_args(workdir, model, *extra):
    return ["eval", "--model", model, "--workdir", workdir, *extra]


def test_eval_compares_base_and_sft(run_cli, workdir, tiny_model_dir):
    from looper.answers import is_correct

    args = eval_args(workdir, tiny_model_dir, "--compare", "base,sft", "--limit", "6", *FAST)
    code, out, err = run_cli(*args)
    assert code == 0, err
    result = last_json(out)
    assert set(result["metrics"]["accuracy"]) == {"base", "sft"}
    assert set(result["metrics"]["mcnemar_p"]) == {"base vs sft"}
    assert result["counts"] == {"questions": 6, "models": 2, "samples": 1, "completions": 12}
    path = Path(result["path"])
    assert path.parent == workdir / "data" / "eval"

    report = json.loads((path / "report.json").read_text())
    for model in ("base", "sft"):
        entry = report["models"][model]
        low, high = entry["ci95"]
        assert entry["n"] == 6 and 0 <= low <= entry["accuracy"] <= high <= 1 and high > low
        assert {"format_compliance", "mean_tokens", "truncation_rate"} <= set(entry)
        assert 0 < entry["mean_tokens"] <= 8
    pair = report["pairs"]["base vs sft"]
    assert 0 <= pair["mcnemar_p"] <= 1 and pair["ci95"][0] <= pair["diff"] <= pair["ci95"][1]
    assert [set(q["correct"]) for q in report["per_question"]] == [{"base", "sft"}] * 6

    table = pq.read_table(path / "completions.parquet")
    assert table.schema.names == [
        "id",
        "model",
        "question",
        "gold_answer",
        "completion",
        "answer",
        "correct",
        "tokens",
        "truncated",
        "sample",
    ]
    assert (
        table.schema.field("correct").type == pa.bool_() and table.schema.field("tokens").type == pa.int32()
    )
    rows = table.to_pylist()
    assert len(rows) == 12 and {r["model"] for r in rows} == {"base", "sft"}
    assert all(r["correct"] == is_correct(r["completion"], r["gold_answer"]) for r in rows)
    assert all(r["truncated"] == (r["tokens"] == 8) for r in rows)

    for png in ("accuracy.png", "lengths.png"):
        assert (path / png).read_bytes().startswith(PNG)
    markdown = (path / "report.md").read_text()
    assert "| base |" in markdown and "| sft |" in markdown and "McNemar p" in markdown

    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"prepare", "sft"}
    assert manifest["generation"]["sampling"] == {
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 8,
        "stop": [],
    }
    assert manifest["generation"]["seed"] == 0 and manifest["prompt"]["format"] == "chat"
    example = manifest["models"]["base"]["prompt_example"]
    assert (
        example.startswith("<|im_start|>user\n") and "#### <answer>" in example
    )  # chat template, training prompt

    code, out, _ = run_cli(*args)
    assert code == 0 and last_json(out)["skipped"] and last_json(out)["version"] == result["version"]


def test_interrupted_eval_resumes_and_reuses_finished_models(run_cli, workdir, tiny_model_dir, monkeypatch):
    # the default --scheduler continuous's generator (HFGenerator with --scheduler static)
    from looper.generation.continuous import ContinuousGenerator as HFGenerator

    common = eval_args(workdir, tiny_model_dir, "--limit", "4", *FAST)
    code, out, err = run_cli(*common, "--compare", "base")
    assert code == 0, err
    base_only = Path(last_json(out)["path"])
    chunks = list((workdir / "data" / "eval" / "cache").glob("*/chunk-*.parquet"))
    assert len(chunks) == 1
    base_chunk, mtime = chunks[0], chunks[0].stat().st_mtime_ns

    calls: list[int] = []
    real_generate = HFGenerator.generate

    def interrupted(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        raise KeyboardInterrupt  # the box dies while the second model generates

    monkeypatch.setattr(HFGenerator, "generate", interrupted)
    code, _, err = run_cli(*common, "--compare", "base,sft")
    assert code == 130 and calls == [4]  # base came from the cache
    assert not [
        p for p in (workdir / "data" / "eval").iterdir() if (p / "manifest.json").is_file() and p != base_only
    ]

    def counted(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real_generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(HFGenerator, "generate", counted)
    code, out, err = run_cli(*common, "--compare", "base,sft")
    assert code == 0, err
    assert calls == [4, 4]  # only sft generated
    assert base_chunk.stat().st_mtime_ns == mtime
    both = pq.read_table(Path(last_json(out)["path"]) / "completions.parquet").to_pylist()
    assert [r for r in both if r["model"] == "base"] == pq.read_table(
        base_only / "completions.parquet"
    ).to_pylist()

    code, out, err = run_cli(*common, "--compare", "sft,base")  # a new report, nothing to generate
    assert code == 0 and not last_json(out)["skipped"] and calls == [4, 4], err
    assert "sft vs base" in last_json(out)["metrics"]["mcnemar_p"]


class Scripted:
    """A generator answering from a script: `answer(question, gold) -> completion text`."""

    logprobs_asked: list[bool] = []

    def __init__(self, golds, answer):
        self.golds, self.answer = golds, answer

    def generate(self, prompts, sampling, *, seed=0, on_progress=None, logprobs=True):
        from looper.generation import Completion

        Scripted.logprobs_asked.append(logprobs)
        out = []
        for prompt in prompts:
            question = max(
                (q for q in self.golds if q in prompt), key=prompt.rindex
            )  # the question asked last
            out.append(Completion(self.answer(question, self.golds[question]), [1, 2, 3], [0.0] * 3, "stop"))
        if on_progress:
            on_progress(len(out), 3 * len(out))
        return out


@pytest.mark.parametrize("fmt", ["chat", "lm-eval"])
def test_scores_and_paired_statistics_with_scripted_models(
    run_cli, workdir, tiny_model_dir, monkeypatch, fmt
):
    """base is always wrong (chat) / only flexible-right (lm-eval); sft always right: known statistics."""
    from looper.eval import completions
    from looper.store.artifacts import Store, read_rows

    prepare = Store(workdir).resolve("prepare").path
    golds = {
        r["question"]: r["gold_answer"]
        for s in ("train", "dev", "test")
        for r in read_rows(prepare / f"{s}.parquet")
    }
    script = {
        "base": lambda q, g: f"So the total is {g}." if fmt == "lm-eval" else "#### 100000",
        "sft": lambda q, g: f"Step one.\n#### {g}",
    }
    monkeypatch.setattr(
        completions, "load_generator", lambda policy, **kw: (Scripted(golds, script[policy.name]), None)
    )
    code, out, err = run_cli(
        *eval_args(workdir, tiny_model_dir, "--compare", "base,sft", "--limit", "6", "--format", fmt, *FAST)
    )
    assert code == 0, err
    assert set(Scripted.logprobs_asked) == {False}  # eval scores text: it asks for no log-probs
    metrics = last_json(out)["metrics"]
    assert metrics["accuracy"] == {"base": 0.0, "sft": 1.0}
    assert metrics["diff"] == {"base vs sft": 1.0}
    assert metrics["mcnemar_p"] == {"base vs sft": pytest.approx(2 * 0.5**6)}
    path = Path(last_json(out)["path"])
    report = json.loads((path / "report.json").read_text())
    assert report["pairs"]["base vs sft"]["only_b_right"] == 6
    assert report["models"]["sft"]["ci95"][1] == 1.0 and report["models"]["base"]["ci95"][0] == 0.0
    if fmt == "lm-eval":
        assert metrics["flexible"] == {"base": 1.0, "sft": 1.0}
        assert report["models"]["base"]["format_compliance"] == 0.0  # no `#### n`: strict-match finds nothing
    else:
        assert report["models"]["base"]["format_compliance"] == 1.0  # an answer, a wrong one
    assert "6 questions (6 shown" in (path / "report.md").read_text()


def test_eval_errors(run_cli, workdir, tiny_model_dir, tmp_path):
    from looper.config import PrepareConfig
    from looper.policy.tiny import tiny_model
    from looper.stages import prepare

    def error(*args, model=tiny_model_dir, where=workdir):
        code, _, err = run_cli(*eval_args(where, model, "--limit", "2", *args))
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        return err

    assert "run `looper ppo` first" in error("--compare", "base,ppo")
    assert "unknown model 'no-such-model'" in error("--compare", "base,no-such-model")
    assert "--temperature > 0" in error("--compare", "base", "--samples", "2")
    assert "--format: 'xyz' is not one of" in error("--compare", "base", "--format", "xyz")
    assert "--split train" in error("--compare", "base", "--split", "train")
    other = tiny_model(tmp_path / "other-base", seed=1)
    assert "was trained on base" in error("--compare", "sft", model=other)
    assert "run `looper prepare` first" in error("--compare", "base", where=tmp_path / "empty")

    single = tmp_path / "single"
    prepare.run(
        PrepareConfig(source=str(write_gsm8k(tmp_path / "one.jsonl", make_rows(20))), workdir=str(single))
    )
    assert "use --split dev" in error("--compare", "base", where=single)


def test_lm_eval_prompt_layout_and_filters():
    shots = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(1, 6)]
    assert lm.build_prompt(shots, "q") == (
        "Question: q1\nAnswer: a1\n\nQuestion: q2\nAnswer: a2\n\nQuestion: q3\nAnswer: a3\n\n"
        "Question: q4\nAnswer: a4\n\nQuestion: q5\nAnswer: a5\n\nQuestion: q\nAnswer:"
    )
    text = "He pays 3 * $400 = $<<3*400=1200>>1,200.\n#### 1,200.\nThen #### 7"
    assert lm.strict_extract(text) == "1,200."  # the first `#### n`
    assert lm.exact_match(lm.strict_extract(text), "1200")
    assert lm.strict_extract("The answer is 42.") == lm.FALLBACK
    assert not lm.exact_match(None, "42") and not lm.exact_match(lm.FALLBACK, "42")
    assert lm.flexible_extract("The answer is 42.") == "42."  # the last number-like run
    assert lm.exact_match("42.", "42")
    assert lm.flexible_extract("2 apples and 3 pears make 5") == "5"  # single digits via the 2nd group
    assert lm.flexible_extract("3 pens cost $1,200, change -8") == "-8"
    assert lm.flexible_extract("no digits") == lm.FALLBACK
    assert lm.normalize("Ann has 2 + 3 = 5 apples.\n#### 5") == "5"
    assert lm.exact_match("$1,000", "1000") and not lm.exact_match("1000.5", "1000")


def test_lm_eval_format_through_the_cli(run_cli, gsm8k_dir, tiny_model_dir, tmp_path):
    """5-shot plain-text prompts from the raw train answers (annotations kept), no chat template."""
    from looper.config import PrepareConfig
    from looper.stages import prepare

    workdir = tmp_path / "w"
    prepare.run(PrepareConfig(source=str(gsm8k_dir), workdir=str(workdir)))
    code, out, err = run_cli(
        *eval_args(workdir, tiny_model_dir, "--format", "lm-eval", "--compare", "base", "--limit", "3", *FAST)
    )
    assert code == 0, err
    result = last_json(out)
    assert set(result["metrics"]) >= {"accuracy", "flexible"}
    path = Path(result["path"])
    manifest = json.loads((path / "manifest.json").read_text())
    # the harness's sampler: one Random(1234), 5 train docs (file order) drawn per question in order
    first_draw = random.Random(1234).sample(range(50), 5)
    assert manifest["prompt"]["fewshot_ids_first_question"] == [f"gsm8k-train-{i:05d}" for i in first_draw]
    assert manifest["prompt"]["fewshot_answers"] == "raw"
    assert manifest["generation"]["sampling"]["stop"] == list(lm.UNTIL)
    example = manifest["models"]["base"]["prompt_example"]
    first_test = json.loads((gsm8k_dir / "test.jsonl").read_text().splitlines()[0])
    i = first_draw[0]
    assert (
        example.startswith(f"Question: Ann has {i} apples")
        and f"<<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}\n\n" in example
    )
    assert example.endswith(f"Question: {first_test['question']}\nAnswer:") and "<|im_start|>" not in example
    report = json.loads((path / "report.json").read_text())
    assert {"accuracy", "ci95"} <= set(report["models"]["base"]["flexible"])
    assert "(strict)" in (path / "report.md").read_text()


def test_source_file_overlapping_training_warns(run_cli, workdir, tiny_model_dir, tmp_path):
    from looper.store.artifacts import Store, read_rows

    train = read_rows(Store(workdir).resolve("prepare").path / "train.parquet")
    source = write_gsm8k(
        tmp_path / "platinum.jsonl",
        [
            {"question": train[0]["question"].upper(), "answer": train[0]["solution"]},  # same after folding
            {
                "question": "Zed has 5 cats and gets 3 more. How many cats does Zed have?",
                "answer": "5 + 3 = 8\n#### 8",
            },
        ],
    )
    code, out, err = run_cli(
        *eval_args(workdir, tiny_model_dir, "--source", source, "--compare", "base", *FAST)
    )
    assert code == 0, err
    assert "warning: 1 of 2 questions" in err
    result = last_json(out)
    assert result["counts"]["questions"] == 2 and result["counts"]["overlap_with_training"] == 1
    manifest = json.loads((Path(result["path"]) / "manifest.json").read_text())
    assert manifest["questions"]["overlap_ids"] == ["platinum-00000"] and "prepare" not in manifest["inputs"]
    assert manifest["models"]["base"]["prompt_example"].count("Problem: Zed") == 0  # first question's prompt
    assert "Problem: " + train[0]["question"].upper() in manifest["models"]["base"]["prompt_example"]


def test_samples_add_maj_and_pass(run_cli, workdir, tiny_model_dir):
    code, out, err = run_cli(
        *eval_args(
            workdir,
            tiny_model_dir,
            "--compare",
            "base",
            "--limit",
            "3",
            "--samples",
            "2",
            "--temperature",
            "0.7",
            *FAST,
        )
    )
    assert code == 0, err
    result = last_json(out)
    assert set(result["metrics"]) == {"accuracy", "mean@2", "maj@2", "pass@2"}
    assert result["metrics"]["pass@2"]["base"] >= result["metrics"]["accuracy"]["base"]
    rows = pq.read_table(Path(result["path"]) / "completions.parquet").to_pylist()
    assert sorted((r["id"], r["sample"]) for r in rows) == sorted(
        {(r["id"], s) for r in rows for s in (0, 1)}
    )
    assert "maj@2" in (Path(result["path"]) / "report.md").read_text()


def test_summarize_hand_written_rows():
    from looper.eval.report import compact, markdown, summarize

    def row(model, qid, gold, sample, answer, correct):
        return {
            "id": qid,
            "model": model,
            "question": "?",
            "gold_answer": gold,
            "completion": f"#### {answer}",
            "answer": answer,
            "correct": correct,
            "tokens": 10 + sample,
            "truncated": sample == 2,
            "sample": sample,
        }

    a = [("q1", "5", ["5", "7", "5"]), ("q2", "3", ["4", "4", "3"]), ("q3", "9", [None, "1", "2"])]
    rows = [row("a", q, g, s, ans, ans == g) for q, g, answers in a for s, ans in enumerate(answers)]
    rows += [row("b", q, g, s, g, True) for q, g, _ in a for s in range(3)]
    report = summarize(rows, ["a", "b"], samples=3, bootstrap=500)
    ea = report["models"]["a"]
    assert ea["accuracy"] == pytest.approx(1 / 3) and ea["correct"] == 1
    assert ea["maj@3"] == pytest.approx(1 / 3)  # q1 right by vote; q2's vote is 4; q3's tie goes to 1
    assert ea["pass@3"] == pytest.approx(2 / 3)
    assert ea["mean@3"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)  # sampled accuracy: 3 of 9 right
    assert ea["format_compliance"] == pytest.approx(8 / 9) and ea["truncation_rate"] == pytest.approx(1 / 3)
    assert ea["mean_tokens"] == pytest.approx(11)
    pair = report["pairs"]["a vs b"]
    assert pair["diff"] == pytest.approx(2 / 3) and pair["only_b_right"] == 2 and pair["only_a_right"] == 0
    assert pair["mcnemar_p"] == pytest.approx(0.5)
    # mean@3 per question: a (2/3, 1/3, 0), b (1, 1, 1); all three differences positive: of the 8
    # sign patterns only 2 reach |mean| >= 2/3, so the sign-flip p is ~0.25
    assert pair["mean@3"]["diff"] == pytest.approx(2 / 3) and 0.15 < pair["mean@3"]["p_value"] < 0.35
    assert report["per_question"][1] == {"id": "q2", "gold_answer": "3", "correct": {"a": False, "b": True}}
    assert compact(report)["mcnemar_p"] == {"a vs b": pytest.approx(0.5)}
    assert "| q2 | 3 | no | yes |" in markdown(report)
