"""`looper prepare`: GSM8K (hub | local JSONL | synthetic) -> train/dev/test Parquet.

    looper prepare                               # openai/gsm8k from the hub
    looper prepare --source ../shared/gsm8k      # a local copy: train.jsonl + test.jsonl
    looper prepare --source synthetic            # offline generated problems
    looper prepare --source hub:openai/gsm8k:main   # any hub dataset / `datasets` dir with train+test
    looper prepare --extra-eval hub:madrylab/gsm8k-platinum   # + a test-only set as its own split

What it does, in order:
1. reads the source's train and test rows, checking each (bad rows stop the run with
   `file:line`, or are skipped and counted with --skip-bad);
2. splits train into train/dev with a seeded shuffle (same seed -> byte-identical files),
   and keeps test untouched: the test split is never trained on;
3. refuses to continue when a test question also appears in train or dev (after folding
   case and punctuation): a leaked test question makes every later number untrustworthy;
4. writes `data/prepare/<version>/{train,dev,test}.parquet` with gold answers normalised
   from the `#### n` line and the tutoring prompt as chat messages.

`--extra-eval [name=]<source>` adds test-only sets (any `looper.data.sources` spec, e.g.
GSM8K-Platinum, which has no train split) as further evaluation splits, `<name>.parquet`,
checked like the rows above and refused like test when a question is also in train/dev;
`looper eval --split <name>` evaluates on one.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import orjson
import pyarrow as pa

from looper.config import PrepareConfig, identity
from looper.data import gsm8k, sources
from looper.data.prompts import tutoring_messages
from looper.errors import LooperError
from looper.hashing import short_hash
from looper.stages import StageResult
from looper.store.artifacts import Store, write_parquet

STAGE = "prepare"
SPLITS = ("train", "dev", "test")

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("gold_answer", pa.string()),
        ("solution", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("split", pa.string()),
        ("source", pa.string()),
    ]
)


def read_source(config: PrepareConfig, bad: gsm8k.BadRows) -> tuple[str, dict[str, list[gsm8k.RawRow]]]:
    """(source tag, {"train": rows, "test": rows}) for the configured source."""
    if config.source == "synthetic":
        from looper.data import synthetic

        if not 1 <= config.difficulty <= 5:
            raise LooperError(f"--difficulty {config.difficulty}: choose 1 to 5 arithmetic steps")
        train, test = synthetic.generate_splits(
            config.synthetic_train, config.synthetic_test, seed=config.seed, difficulty=config.difficulty
        )
        as_rows = lambda items, split: [  # noqa: E731
            gsm8k.RawRow(r["question"], r["answer"], f"synthetic:{split}:{i}", i) for i, r in enumerate(items)
        ]
        return "synthetic", {"train": as_rows(train, "train"), "test": as_rows(test, "test")}
    if config.source == "hub":
        return "gsm8k", {split: gsm8k.read_hub(config.dataset, split) for split in ("train", "test")}
    path = Path(config.source).expanduser()
    if config.source.startswith(sources.HUB) or sources.saved_by_datasets(path):
        # any hub dataset or `datasets` directory with train and test splits (GSM8K columns)
        return "gsm8k", {
            split: sources.load(
                f"{config.source}@{split}", option="--source", skip_bad=config.skip_bad, bad=bad
            ).rows
            for split in ("train", "test")
        }
    if path.is_dir():
        missing = [f for f in ("train.jsonl", "test.jsonl") if not (path / f).is_file()]
        if missing:
            raise LooperError(f"--source {path}: no {' or '.join(missing)} in that directory")
        return "gsm8k", {
            split: gsm8k.read_jsonl(path / f"{split}.jsonl", skip_bad=config.skip_bad, bad=bad)
            for split in ("train", "test")
        }
    if path.is_file():
        return "gsm8k", {"train": gsm8k.read_jsonl(path, skip_bad=config.skip_bad, bad=bad), "test": []}
    raise LooperError(
        f"--source {config.source}: not 'hub', 'synthetic', hub:<dataset>[:<config>], or an existing "
        "directory or .jsonl file"
    )


def check_split_name(name: str, item: str, taken: dict) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) or name in SPLITS or name in taken:
        raise LooperError(
            f"--extra-eval {item}: split name {name!r} is taken or not a lower-case name "
            "(letters, digits, - and _): give one as name=<source>"
        )
    return name


def read_extra_eval(config: PrepareConfig, bad: gsm8k.BadRows) -> dict[str, sources.QuestionSet]:
    """{split name: question set} for --extra-eval ('[name=]spec' items, comma-separated)."""
    extra: dict[str, sources.QuestionSet] = {}
    for item in (x.strip() for x in (config.extra_eval or "").split(",")):
        if not item:
            continue
        name, _, spec = item.partition("=") if "=" in item.split(":", 1)[0] else ("", "", item)
        if name.strip():
            check_split_name(name.strip(), item, extra)
        qset = sources.load(spec, option="--extra-eval", skip_bad=config.skip_bad, bad=bad)
        name = name.strip() or check_split_name(qset.name, item, extra)
        if not qset.rows:
            raise LooperError(f"--extra-eval {item}: no questions")
        extra[name] = qset
    return extra


def build_row(raw: gsm8k.RawRow, split: str, origin_split: str, source: str) -> dict:
    return {
        "id": f"{source}-{origin_split}-{raw.index:05d}",
        "question": raw.question.strip(),
        "gold_answer": gsm8k.normalize_gold(raw.answer),
        "solution": gsm8k.clean_solution(raw.answer),
        "prompt": tutoring_messages(raw.question),
        "split": split,
        "source": source,
    }


def split_train_dev(rows: list, dev_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle then cut; the order within each split is the shuffled order."""
    if not 0.0 <= dev_fraction < 1.0:
        raise LooperError(f"--dev-fraction {dev_fraction}: choose a value in [0, 1)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_dev = round(len(rows) * dev_fraction)
    return [rows[i] for i in order[n_dev:]], [rows[i] for i in order[:n_dev]]


def check_no_leak(splits: dict[str, list[dict]]) -> None:
    """Every evaluation split (test and the --extra-eval ones) must be unseen in train/dev."""
    seen = {gsm8k.normalize_text(r["question"]): r["id"] for s in ("train", "dev") for r in splits[s]}
    for split in (s for s in splits if s not in ("train", "dev")):
        leaked = [
            (r["id"], seen[k]) for r in splits[split] if (k := gsm8k.normalize_text(r["question"])) in seen
        ]
        if leaked:
            test_id, train_id = leaked[0]
            raise LooperError(
                f"{len(leaked)} {split} question(s) also appear in train/dev (e.g. {test_id} = {train_id}): "
                f"remove them from the source's train file so the {split} split stays unseen"
            )


def run(config: PrepareConfig) -> StageResult:
    store = Store(config.workdir, wait=config.wait)
    bad = gsm8k.BadRows()
    source, raw = read_source(config, bad)
    extra = read_extra_eval(config, bad)
    raw |= {name: qset.rows for name, qset in extra.items()}
    if config.limit is not None:
        raw = {split: rows[: config.limit] for split, rows in raw.items()}
    if not raw["train"]:
        raise LooperError(f"--source {config.source}: no usable train questions")

    # The version hashes the source rows themselves, so an edited source file is a new version.
    source_hash = short_hash(
        [[r.question, r.answer] for split in ("train", "test") for r in raw[split]], n=64
    )
    inputs = {"source": source_hash}
    if extra:  # their content too: an updated hub dataset under the same name is a new version
        inputs["extra_eval"] = {
            name: short_hash([[r.question, r.answer] for r in raw[name]], n=64) for name in extra
        }
    version = store.version_for(STAGE, identity(config), inputs)
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)

    train, dev = split_train_dev(raw["train"], config.dev_fraction, config.seed)
    splits = {
        "train": [build_row(r, "train", "train", source) for r in train],
        "dev": [build_row(r, "dev", "train", source) for r in dev],
        "test": [build_row(r, "test", "test", source) for r in raw["test"]],
    } | {
        name: [build_row(r, name, qset.split or "test", name) for r in raw[name]]
        for name, qset in extra.items()
    }
    check_no_leak(splits)

    run_ = store.begin(STAGE, version)
    for split in splits:
        write_parquet(run_.path / f"{split}.parquet", splits[split], ROW_SCHEMA)
    counts = {split: len(rows) for split, rows in splits.items()} | {"skipped_bad": bad.count}
    artifact = run_.commit(
        config=orjson.loads(orjson.dumps(config.__dict__)),
        inputs={},
        identity=identity(config),
        counts=counts,
        extra={
            "source": {"kind": source, "spec": config.source, "hash": source_hash, "bad_rows": bad.examples},
            "extra_eval": {name: qset.about for name, qset in extra.items()},
        },
    )
    return StageResult.from_artifact(artifact)
