"""`looper loop`'s round bookkeeping: its record of rounds, the early stop, the final round.

The record (`rounds.json` in the loop's partial artifact) lists the finished rounds with
their versions and figures, and the round in progress; these functions read it back and
decide from it, without running anything, so they are tested with hand-written rounds.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from looper.errors import LooperError


def read_record(path: Path) -> dict:
    """The record a previous run of this loop version left, for resume."""
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise LooperError(
            f"{path}: unreadable ({exc}): rerun with --force to start the loop's record "
            "afresh (finished stages are still reused)"
        ) from None


def rounds_without_improvement(sft_accuracy: float, accuracies: list[float]) -> int:
    """Trailing rounds whose dev accuracy did not beat the best before them (sft is round 0)."""
    best, since = sft_accuracy, 0
    for accuracy in accuracies:
        if accuracy > best:
            best, since = accuracy, 0
        else:
            since += 1
    return since


def final_round(rounds: list[dict], final: str) -> dict:
    """The round whose adapter the loop keeps: the last, or the earliest with the best dev accuracy."""
    if final == "last":
        return rounds[-1]
    best = max(r["figures"]["dev"]["accuracy"] for r in rounds)
    return next(r for r in rounds if r["figures"]["dev"]["accuracy"] == best)


def patience_exhausted(rounds: list[dict], patience: int) -> bool:
    """Whether dev accuracy has not beaten the best so far (sft is round 0) for `patience` rounds."""
    if not rounds:
        return False
    accuracies = [r["figures"]["dev"]["accuracy"] for r in rounds]
    return rounds_without_improvement(rounds[0]["figures"]["sft_dev"]["accuracy"], accuracies) >= patience


# --------------------------------------------------------------------------- a record that moves with the home

PATH_KEYS = ("path", "export", "policy_in")  # the record's fields that may hold a path


def policy_name(entry: dict) -> str:
    """How a round's adapter is named to the stages (`--policy`, `--compare`): `<stage>:<version>`,
    never its path, so rows, eval identities and versions are the same in any home."""
    return f"{entry['stage']}:{entry['version']}"


def portable(obj, home: Path):
    """`obj` (the record, the loop's summary) with every path inside `home` made relative to it."""
    if isinstance(obj, dict):
        return {
            k: _relative(v, home) if k in PATH_KEYS and isinstance(v, str) else portable(v, home)
            for k, v in obj.items()
        }
    return [portable(v, home) for v in obj] if isinstance(obj, list) else obj


def anchored(obj, home: Path):
    """The inverse of `portable` for this home; a record written by an older looper (absolute paths
    into the home it was run in) is re-anchored by the paths' last `data|checkpoints/<stage>/<v>`."""
    if isinstance(obj, dict):
        return {
            k: _absolute(v, home) if k in PATH_KEYS and isinstance(v, str) else anchored(v, home)
            for k, v in obj.items()
        }
    return [anchored(v, home) for v in obj] if isinstance(obj, list) else obj


def _relative(value: str, home: Path) -> str:
    path = Path(value)
    return str(path.relative_to(home)) if path.is_absolute() and path.is_relative_to(home) else value


def _absolute(value: str, home: Path) -> str:
    path = Path(value)
    if ":" in value.split("/", 1)[0]:  # a policy name (<stage>:<version>), not a path
        return value
    if not path.is_absolute():
        return str(home / path)
    parts = path.parts
    if not path.exists() and len(parts) > 3 and parts[-3] in ("data", "checkpoints"):
        return str(home.joinpath(*parts[-3:]))
    return value
