"""The questions `looper eval` scores and the prompts it builds for them.

`load_questions` takes them from the prepare artifact (its test or dev split, or an extra
evaluation split `looper prepare --extra-eval` added) or from any GSM8K-shaped `--source`
(`looper.data.sources`), and warns when a source's questions are in the training data.
`build_prompts` renders each question for one model: the training prompt through the model's
chat template (`chat`), or lm-evaluation-harness' 5-shot plain text (`lm-eval`), whose
examples `fewshot_examples` draws exactly as the harness does.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from looper.config import EvalConfig
from looper.data import gsm8k, lm_eval_format, sources
from looper.data.prompts import render_prompt, tutoring_messages
from looper.errors import LooperError
from looper.policy import models
from looper.policy.policies import Policy
from looper.store.artifacts import Artifact, Store, read_rows


def split_rows(prepare: Artifact, split: str) -> list[dict]:
    return read_rows(prepare.path / f"{split}.parquet")


def load_questions(config: EvalConfig, store: Store) -> tuple[list[dict], dict, Artifact | None, dict]:
    """(question rows, version inputs, prepare artifact if any, what the manifest says about them)."""
    if config.source is None:
        prepare = store.resolve("prepare", config.prepare)
        if not (prepare.path / f"{config.split}.parquet").is_file():
            present = sorted(p.stem for p in prepare.path.glob("*.parquet") if p.stem != "train")
            raise LooperError(
                f"--split {config.split}: prepare {prepare.version} has no such split (it has "
                f"{', '.join(present)}; add one with `looper prepare --extra-eval`)"
            )
        rows = split_rows(prepare, config.split)
        if not rows and config.split == "test":
            raise LooperError(
                f"prepare {prepare.version} has no test split (a single-file source has none): "
                "use --split dev, or --source FILE"
            )
        if not rows:
            raise LooperError(f"prepare {prepare.version} has an empty {config.split} split")
        rows = rows[: config.limit]
        return (
            rows,
            {"prepare": prepare},
            prepare,
            {
                "from": f"prepare {prepare.version} {config.split} split",
                "dataset": dataset_name(prepare, config.split),
                "prepare": prepare.version,
                "split": config.split,
            },
        )
    bad = gsm8k.BadRows()
    qset = sources.load(config.source, option="--source", skip_bad=config.skip_bad, bad=bad)
    raw = qset.rows[: config.limit]
    if not raw:
        raise LooperError(f"--source {config.source}: no questions")
    rows = [
        {
            "id": f"{qset.name}-{r.index:05d}",
            "question": r.question.strip(),
            "gold_answer": gsm8k.normalize_gold(r.answer),
            "prompt": tutoring_messages(r.question),
        }
        for r in raw
    ]
    digest = qset.about["rows_hash"]
    about = {
        "from": config.source,
        "dataset": qset.name,
        "source": qset.about,
        "skipped_bad": bad.count,
        "bad_rows": bad.examples,
    }
    try:
        prepare = store.resolve("prepare", config.prepare)
    except LooperError:
        if config.prepare not in (None, "", "latest"):
            raise
        if config.format == "lm-eval":
            raise LooperError(
                "--format lm-eval takes its 5 examples from a prepare artifact's train split: "
                "run `looper prepare` first"
            ) from None
        print(
            f"eval: warning: no prepare artifact under {store.workdir}: cannot check --source questions "
            "against the training data",
            file=sys.stderr,
        )
        return rows, {"source": digest}, None, about
    seen = {gsm8k.normalize_text(r["question"]) for s in ("train", "dev") for r in split_rows(prepare, s)}
    overlap = [r["id"] for r in rows if gsm8k.normalize_text(r["question"]) in seen]
    if overlap:
        print(
            f"eval: warning: {len(overlap)} of {len(rows)} questions in {config.source} also appear in the training "
            f"data (prepare {prepare.version} train/dev; e.g. {overlap[0]}): their accuracy is not held out",
            file=sys.stderr,
        )
    about |= {
        "prepare_checked": prepare.version,
        "overlap_with_training": len(overlap),
        "overlap_ids": overlap[:100],
    }
    inputs = {"source": digest} | ({"prepare": prepare} if config.format == "lm-eval" else {})
    return rows, inputs, prepare, about


def dataset_name(prepare: Artifact, split: str) -> str:
    """What a prepare split holds, for the report: 'gsm8k test', 'synthetic dev', 'gsm8k-platinum'."""
    if split in prepare.manifest.get("extra_eval", {}):
        return split
    return f"{prepare.manifest.get('source', {}).get('kind', 'prepare')} {split}"


def fewshot_examples(prepare: Artifact, rows: list[dict]) -> tuple[list[list[dict]], str]:
    """The harness's few-shot examples for each evaluated question, in order.

    lm-evaluation-harness' gsm8k task has no `fewshot_config`, so its default sampler draws
    `random.Random(1234).sample(train_docs, 5)` afresh for each document, in document order,
    from the whole train split in file order. We rebuild that pool from the prepare
    artifact's train and dev rows (sorted back into source order) and draw the same way, so
    the prompts are the harness's byte for byte when the pool is the full GSM8K train file."""
    index = lambda row: int(row["id"].rsplit("-", 1)[1])  # noqa: E731 - prepare ids end in the source row index
    evaluated = {r["id"] for r in rows}
    pool = sorted(
        (r for s in ("train", "dev") for r in split_rows(prepare, s) if r["id"] not in evaluated), key=index
    )
    if len(pool) < lm_eval_format.NUM_FEWSHOT:
        raise LooperError(
            f"prepare {prepare.version} has fewer than {lm_eval_format.NUM_FEWSHOT} train questions "
            "for --format lm-eval's examples"
        )
    raw = raw_train_rows(prepare)
    if raw is not None and all(
        index(r) in raw and raw[index(r)].question.strip() == r["question"] for r in pool
    ):
        pool, note = (
            [{"id": r["id"], "question": r["question"], "answer": raw[index(r)].answer} for r in pool],
            "raw",
        )
    else:
        pool = [{"id": r["id"], "question": r["question"], "answer": r["solution"]} for r in pool]
        note = "prepare solutions (<<...>> calculator annotations stripped; the harness keeps them)"
    rnd = random.Random(lm_eval_format.FEWSHOT_SEED)
    return [rnd.sample(pool, lm_eval_format.NUM_FEWSHOT) for _ in rows], note


def raw_train_rows(prepare: Artifact) -> dict[int, gsm8k.RawRow] | None:
    """The unmodified GSM8K train rows the prepare artifact was built from, when re-readable."""
    source = prepare.manifest.get("source", {})
    if source.get("kind") != "gsm8k":
        return None
    try:
        if source.get("spec") == "hub":
            rows = gsm8k.read_hub(prepare.manifest["config"]["dataset"], "train")
        else:
            path = Path(source["spec"]).expanduser()
            rows = gsm8k.read_jsonl(
                path / "train.jsonl" if path.is_dir() else path, skip_bad=True, bad=gsm8k.BadRows()
            )
    except (LooperError, OSError, KeyError):
        return None
    return {r.index: r for r in rows}


def build_prompts(policy: Policy, rows: list[dict], config: EvalConfig, shots: list[list[dict]]) -> list[str]:
    if config.format == "lm-eval":
        return [lm_eval_format.build_prompt(row_shots, r["question"]) for row_shots, r in zip(shots, rows)]
    tokenizer = models.load_tokenizer(policy.source, trust_remote_code=config.trust_remote_code)
    return [render_prompt(tokenizer, r["prompt"]) for r in rows]
