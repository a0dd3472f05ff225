"""The three hashes Looper takes, written once: a file's sha256, a directory tree's, and a short
hash of a JSON-able value (versions, cache keys, row fingerprints)."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import orjson


def sha256_file(path: Path) -> str:
    """sha256 of one file's bytes, read in 1 MiB chunks (model weights do not fit a read())."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_hash(root: Path, skip: Collection[str] = ()) -> str:
    """sha256 over the relative paths and bytes of the files under `root`, in sorted order.

    Top-level entries named in `skip` and hidden files (temp files of a write in flight) are left
    out, so trainer state and logs do not change an artifact's content hash."""
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        if rel.parts[0] in skip or rel.name.startswith("."):
            continue
        digest.update(str(rel).encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def short_hash(obj: Any, n: int = 12) -> str:
    """The first `n` hex digits of the sha256 of `obj` as key-sorted JSON."""
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()[:n]
