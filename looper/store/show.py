"""`looper show`: an artifact's rows on stdout, as JSONL, CSV or a readable table.

    looper show rollouts                          # latest rollouts, a table on a terminal
    looper show rollouts --format jsonl | head -1 # one JSON object per line (nested arm outputs included)
    looper show eval 3f2a9c1b0d4e --columns id,model,answer,correct --format csv
    looper show rollouts --question synthetic-train-00012   # that question's arms side by side
    looper show sft                               # a training stage: its metrics.jsonl log

Storage stays Parquet; this is a view. The rows are the artifact's tables in order:
prepare `train, dev, test` then any `--extra-eval` splits (each row names its `split`),
rollouts its `shard-*.parquet` files, eval `completions.parquet`; sft, ppo and dpo their
training log (`metrics.jsonl`), loop its `rounds.json` record. JSONL is written with orjson
(floats round-trip exactly), so `looper show STAGE --format jsonl` parses back to the rows
pyarrow reads. CSV puts nested values (lists, structs) in a cell as JSON. The table shows
at most 20 rows unless --limit says otherwise, long text cut to fit.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from looper.errors import LooperError
from looper.store.artifacts import SCHEMA_VERSIONS, Artifact, Store

FORMATS = ("jsonl", "csv", "table")
TABLE_ROWS = 20  # rows a table shows without --limit
CELL = 60  # characters of a table cell
PREPARE_ORDER = ("train", "dev", "test")


def tables(artifact: Artifact) -> list[Path]:
    """The files holding the artifact's rows, in the order they are shown."""
    path = artifact.path
    if artifact.stage == "prepare":
        files = sorted(path.glob("*.parquet"))
        rank = {name: i for i, name in enumerate(PREPARE_ORDER)}
        return sorted(files, key=lambda f: (rank.get(f.stem, len(rank)), f.stem))
    if artifact.stage == "rollouts":
        return sorted(path.glob("shard-*.parquet"))
    if artifact.stage == "eval":
        return [path / "completions.parquet"]
    if artifact.stage == "loop":
        return [path / "rounds.json"]
    return [path / "metrics.jsonl"] if (path / "metrics.jsonl").is_file() else []


def iter_rows(files: list[Path], columns: list[str] | None, question: str | None) -> Iterator[dict]:
    """Rows of the files, streamed batch by batch (a `head` reads only what it shows)."""
    import pyarrow.parquet as pq

    for f in files:
        if f.suffix == ".parquet":
            if question is not None:  # pushed down to the reader: only matching row groups are decoded
                yield from pq.read_table(f, columns=columns, filters=[("id", "=", question)]).to_pylist()
                continue
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns):
                yield from batch.to_pylist()
            continue
        if f.suffix == ".json":  # loop: {"rounds": [...], ...}
            rows = orjson.loads(f.read_bytes()).get("rounds", [])
        else:
            rows = [orjson.loads(line) for line in f.read_bytes().splitlines() if line.strip()]
        for row in rows:
            if question is None or row.get("id") == question:
                yield {k: row.get(k) for k in columns} if columns else row


def available_columns(files: list[Path]) -> list[str]:
    import pyarrow.parquet as pq

    names: dict[str, None] = {}
    for f in files:
        if f.suffix == ".parquet":
            names |= dict.fromkeys(pq.read_schema(f).names)
        else:
            for row in iter_rows([f], None, None):
                names |= dict.fromkeys(row)
    return list(names)


def show(
    stage: str,
    version: str | None,
    *,
    workdir: str,
    fmt: str | None = None,
    limit: int | None = None,
    columns: str | None = None,
    question: str | None = None,
) -> None:
    if stage not in SCHEMA_VERSIONS:
        raise LooperError(f"show {stage}: no such stage (choose one of {', '.join(SCHEMA_VERSIONS)})")
    fmt = fmt or ("table" if sys.stdout.isatty() else "jsonl")
    if fmt not in FORMATS:
        raise LooperError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise LooperError(f"--limit {limit}: must be >= 1")
    artifact = Store(workdir).resolve(stage, version)
    files = tables(artifact)
    if not files:
        raise LooperError(f"{stage} {artifact.version}: no rows to show in {artifact.path}")
    known = available_columns(files)
    wanted = [c.strip() for c in (columns or "").split(",") if c.strip()] or None
    unknown = [c for c in wanted or [] if c not in known]
    if unknown:
        raise LooperError(f"--columns: no column {', '.join(unknown)} in {stage} (has {', '.join(known)})")
    if question is not None and "id" not in known:
        raise LooperError(f"--question: {stage} rows have no question id")
    if question is not None and stage == "rollouts" and fmt == "table" and wanted is None:
        rows = list(iter_rows(files, None, question))
        if not rows:
            raise LooperError(f"--question {question}: not in rollouts {artifact.version}")
        return side_by_side(rows[0])
    rows = iter_rows(files, wanted, question)
    if fmt == "table":
        limit = limit or TABLE_ROWS
    try:
        if fmt == "jsonl":
            write_jsonl(rows, limit)
        elif fmt == "csv":
            write_csv(rows, wanted or known, limit)
        else:
            write_table(rows, wanted or known, limit, f"{stage} {artifact.version}")
    except BrokenPipeError:  # `looper show ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def limited(rows: Iterator[dict], limit: int | None) -> Iterator[dict]:
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield row


def write_jsonl(rows: Iterator[dict], limit: int | None) -> None:
    out = sys.stdout.buffer
    for row in limited(rows, limit):
        out.write(orjson.dumps(row) + b"\n")
    out.flush()


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return orjson.dumps(value).decode()
    return str(value)


def write_csv(rows: Iterator[dict], columns: list[str], limit: int | None) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    for row in limited(rows, limit):
        writer.writerow([csv_cell(row.get(c)) for c in columns])
    sys.stdout.flush()


def short(value: Any, width: int = CELL) -> str:
    """A table cell: nested lists summarised by length, long text cut with an ellipsis."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = list(value[0])
        text = f"[{len(value)} x {{{', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}}}]"
    elif isinstance(value, list) and value and isinstance(value[0], float):
        text = "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = csv_cell(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def console():
    from rich.console import Console

    # markup off: questions and completions hold brackets that are not rich markup
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200, markup=False)


def cells(values) -> list:
    from rich.text import Text

    return [Text(v) for v in values]


def write_table(rows: Iterator[dict], columns: list[str], limit: int, title: str) -> None:
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    shown = 0
    for row in limited(rows, limit):
        table.add_row(*cells(short(row.get(c)) for c in columns))
        shown += 1
    table.caption = f"{shown} row(s) shown (--limit N for more, --format jsonl for everything)"
    console().print(table)


def side_by_side(row: dict) -> None:
    """One rollouts question: its scores, then one column per arm with that arm's answer and reward."""
    from rich.table import Table

    out = console()
    scores = "  ".join(f"{k} {row[k]:.3f}" for k in ("s_end", "s_path", "s_cf", "s_wm", "reward"))
    out.print(f"{row['id']}  gold {row['gold_answer']}  policy {row['policy']}", style="bold")
    out.print(row["question"])
    out.print(scores)
    arms = row["arm_outputs"]
    table = Table(show_lines=True)
    table.add_column("")
    for arm in arms:
        table.add_column(arm["arm"], overflow="fold")
    rewards = row["arm_rewards"]
    lines = {
        "style": [f"{a['style']} t={a['temperature']:g}" for a in arms],
        "answer": [str(a["answer"]) for a in arms],
        "correct": ["yes" if a["correct"] else "no" for a in arms],
        "reward": [f"{r:.3f}" for r in rewards] if len(rewards) == len(arms) else ["-"] * len(arms),
        "tokens": [f"{a['tokens']} ({a['finish_reason']})" for a in arms],
        "text": [short(a["text"], 400) for a in arms],
    }
    for name, values in lines.items():
        table.add_row(*cells([name, *values]))
    out.print(table)
    if row.get("cf_outputs"):
        cf = Table(title="counterfactual re-asks (s_cf)")
        for c in ("arm", "perturbation", "answer", "tokens"):
            cf.add_column(c)
        for o in row["cf_outputs"]:
            cf.add_row(*cells([o["arm"], o["perturbation"], str(o["answer"]), str(o["tokens"])]))
        out.print(cf)
