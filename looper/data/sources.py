"""GSM8K-shaped question sets from wherever a Hugging Face user keeps them.

    hub:<dataset>[:<config>][@<split>]   `datasets.load_dataset`, e.g. hub:madrylab/gsm8k-platinum,
                                         hub:openai/gsm8k:main@test; <dataset> may also be a local
                                         directory (a `save_to_disk` copy or a clone of the hub repo)
    DIR[@<split>]                        a directory written by `datasets` save_to_disk (Dataset or
                                         DatasetDict), else any directory `load_dataset` reads
    FILE.jsonl | FILE.parquet            one table

`looper eval --source` and `looper prepare --extra-eval` read their questions through `load`.
The split defaults to `test`; a DatasetDict holding a single split gives that one. Rows need
the GSM8K columns `question` and `answer` (a worked solution ending in `#### <number>`);
other columns (GSM8K-Platinum's `cleaning_status`) are not needed, only counted. Every row is
checked as `looper prepare` checks its input: a bad row stops the run with where it is, or,
with skip_bad, is skipped and counted in `bad` (then in the manifest).

Offline: `hub:` needs the hub or the `datasets` cache (HF_DATASETS_OFFLINE=1); on a box
without either, save the set on one with internet and copy the directory over:
`python -c "import datasets; datasets.load_dataset('madrylab/gsm8k-platinum').save_to_disk('gsm8k-platinum')"`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looper.data import gsm8k
from looper.errors import LooperError
from looper.hashing import short_hash

HUB = "hub:"


@dataclass
class QuestionSet:
    name: str  # short name for ids, split names and report titles, e.g. "gsm8k-platinum"
    split: str | None  # None for a single file
    rows: list[gsm8k.RawRow]
    about: dict[str, Any] = field(default_factory=dict)  # what the manifest records about the source


def set_name(text: str) -> str:
    """A short, file- and id-safe name: the last path component, lower-cased."""
    last = text.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9_-]+", "-", Path(last).stem.lower()).strip("-") or "questions"


def parse(spec: str) -> tuple[str, str | None, str | None]:
    """(dataset or path, config, split) of a source spec (see the module docstring); None: not given."""
    body = spec[len(HUB) :] if spec.startswith(HUB) else spec
    split = None
    if "@" in body and not Path(body).expanduser().exists():
        body, split = body.rsplit("@", 1)
    config = None
    if spec.startswith(HUB) and ":" in body and not Path(body).expanduser().exists():
        body, config = body.rsplit(":", 1)
    if not body or split == "" or config == "":
        raise LooperError(f"{spec!r}: expected hub:<dataset>[:<config>][@<split>] or a path")
    return body, config, split


def load(
    spec: str, *, option: str, skip_bad: bool, bad: gsm8k.BadRows, default_split: str = "test"
) -> QuestionSet:
    """The checked rows of `spec`; errors are one line naming `option` (e.g. '--source')."""
    target, config, split = parse(spec)
    path = Path(target).expanduser()
    if not spec.startswith(HUB) and not path.exists():
        raise LooperError(
            f"{option} {spec}: no such file or directory (a .jsonl/.parquet file, a `datasets` "
            "directory, or hub:<dataset>[:<config>][@<split>] for the Hugging Face hub)"
        )
    about: dict[str, Any] = {"spec": spec}
    if path.is_file():
        if path.suffix == ".jsonl":
            rows = gsm8k.read_jsonl(path, skip_bad=skip_bad, bad=bad)
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path).to_pylist()
            rows = check_rows(table, lambda i: f"{path} row {i}", skip_bad, bad, option)
        else:
            raise LooperError(f"{option} {path}: not a .jsonl or .parquet file")
        about |= {"path": str(path.resolve()), "split": None}
        split = None
        name = set_name(path.name)
    else:
        data, split = load_dataset_split(spec, target, config, split, default_split, option)
        missing = [c for c in ("question", "answer") if c not in data.column_names]
        if missing:
            raise LooperError(
                f"{option} {spec}: no {' or '.join(repr(c) for c in missing)} column (has "
                f"{', '.join(data.column_names)}); a GSM8K-shaped set has question and answer"
            )
        rows = check_rows(data, lambda i: f"{spec}[{split}] row {i}", skip_bad, bad, option)
        about |= {"dataset": target, "config": config, "split": split, "columns": data.column_names}
        if "cleaning_status" in data.column_names:  # GSM8K-Platinum: consensus / verified / revised
            about["cleaning_status"] = dict(Counter(data["cleaning_status"]))
        name = set_name(target)
    about |= {"rows": len(rows), "rows_hash": short_hash([[r.question, r.answer] for r in rows], n=64)}
    return QuestionSet(name, split, rows, about)


def saved_by_datasets(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_dataset_split(
    spec: str, target: str, config: str | None, split: str | None, default_split: str, option: str
):
    """(one split as a `datasets.Dataset`, its name): load_from_disk for save_to_disk copies, else
    load_dataset. Without an explicit split: `default_split`, or a DatasetDict's only split."""
    import datasets

    path = Path(target).expanduser()
    try:
        if saved_by_datasets(path):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                split = split or (next(iter(data)) if len(data) == 1 else default_split)
                if split not in data:
                    raise LooperError(
                        f"{option} {spec}: no split {split!r} (has {', '.join(data)}); add @<split>"
                    )
                return data[split], split
            return data, split  # a single Dataset was saved: it is the split
        split = split or default_split
        return datasets.load_dataset(str(path) if path.is_dir() else target, config, split=split), split
    except LooperError:
        raise
    except Exception as exc:  # the hub raises many types: offline, not found, auth, bad config/split
        detail = " ".join(str(exc).split())[:300]
        raise LooperError(
            f"{option} {spec}: could not load it with datasets ({type(exc).__name__}: {detail}); "
            "offline, pass a directory saved by `datasets` save_to_disk on a box with internet (README)"
        ) from None


def check_rows(table, where, skip_bad: bool, bad: gsm8k.BadRows, option: str) -> list[gsm8k.RawRow]:
    """GSM8K checks on rows already parsed (datasets/Parquet); `where(i)` names row i in errors."""
    rows = []
    for i, obj in enumerate(table):
        try:
            question, answer = gsm8k.check_row(obj)
        except ValueError as exc:
            if not skip_bad:
                raise LooperError(
                    f"{where(i)}: {exc} (fix the row, or pass --skip-bad to skip such rows)"
                ) from None
            bad.add(f"{where(i)}: {exc}")
            continue
        rows.append(gsm8k.RawRow(question, answer, where(i), i))
    return rows
