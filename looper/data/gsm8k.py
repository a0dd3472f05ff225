"""GSM8K-format rows: read them (hub, local JSONL), check them, clean them.

A GSM8K row is `{"question": str, "answer": str}` where the answer is a worked solution
whose last line is `#### <number>`. Malformed rows stop the run with an error naming the
file and line, unless the caller asked to skip them (then they are counted, never dropped
silently).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from looper.answers import normalize_number
from looper.errors import LooperError

# GSM8K solutions carry calculator annotations `<<48/2=24>>`; a tutor does not write them.
_CALC = re.compile(r"<<[^<>]*>>")
_GOLD = re.compile(r"^\s*\$?\s*(-?[\d,]*\.?\d+)\s*$")


@dataclass
class RawRow:
    question: str
    answer: str
    origin: str  # "file:line" or "hub:split:index", for error messages and ids
    index: int


@dataclass
class BadRows:
    """Rows skipped under --skip-bad, kept so the manifest can say how many and why."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < 20:
            self.examples.append(message)


def normalize_gold(answer: str) -> str:
    """The gold answer after `####`, as a canonical number string ('1,000' -> '1000').

    Raises ValueError when there is no `####` line or what follows is not a number.
    """
    if "####" not in answer:
        raise ValueError("no '#### <answer>' line")
    final = answer.rsplit("####", 1)[1].strip()
    match = _GOLD.match(final)
    if not match:
        raise ValueError(f"gold answer {final!r} is not a number")
    # the same canonical form extract_answer gives, so golds and answers compare as strings too
    return normalize_number(match.group(1))


def clean_solution(answer: str) -> str:
    """The worked solution without calculator annotations, ending with its `#### n` line."""
    return _CALC.sub("", answer).strip()


def check_row(obj: object) -> tuple[str, str]:
    """(question, answer) of one GSM8K-format row; ValueError saying what is wrong otherwise."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    question, answer = obj.get("question"), obj.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing 'question'")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("missing 'answer'")
    normalize_gold(answer)
    return question, answer


def read_jsonl(path: Path, *, skip_bad: bool, bad: BadRows) -> list[RawRow]:
    """GSM8K-format JSONL; every problem is reported as `path:line: what is wrong`."""
    rows: list[RawRow] = []
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                question, answer = check_row(orjson.loads(line))
            except (orjson.JSONDecodeError, ValueError) as exc:
                message = f"{where}: {'invalid JSON' if isinstance(exc, orjson.JSONDecodeError) else exc}"
                if not skip_bad:
                    raise LooperError(
                        f"{message} (fix the row, or pass --skip-bad to skip such rows)"
                    ) from None
                bad.add(message)
                continue
            rows.append(RawRow(question, answer, where, line_no - 1))
    return rows


def read_hub(dataset: str, split: str) -> list[RawRow]:
    """Rows of a hub dataset split (GSM8K's `main` config)."""
    try:
        from datasets import load_dataset

        data = load_dataset(dataset, "main", split=split)
    except Exception as exc:  # the hub raises many types: offline, not found, auth
        detail = " ".join(str(exc).split())[:200]
        raise LooperError(
            f"could not load {dataset} ({split}) from the Hugging Face hub ({type(exc).__name__}: {detail}); "
            "pass --source PATH to a local GSM8K JSONL copy, or --source synthetic; a test-only set "
            f"(e.g. GSM8K-Platinum) goes in --extra-eval hub:{dataset} or `looper eval --source hub:{dataset}`"
        ) from None
    return [RawRow(r["question"], r["answer"], f"hub:{dataset}:{split}:{i}", i) for i, r in enumerate(data)]


def normalize_text(question: str) -> str:
    """Text used to detect the same question in two splits: case, spacing, punctuation folded."""
    return re.sub(r"[^a-z0-9]+", " ", question.lower()).strip()
