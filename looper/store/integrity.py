"""Artifacts that check themselves: manifests read with a clear error, per-file sha256, verify.

Every manifest lists its files (`files`: path, bytes, sha256). `Run.commit` checks the
directory against that list before publishing it, `looper verify` re-hashes finished
artifacts against it, and `looper status` compares sizes (cheap) to flag truncated files.
Manifests written before the list existed are checked against their content `hash`.

A manifest that cannot be read is `BrokenArtifact`: one line naming the file and the two
ways out (`looper gc --broken` removes the broken version, `--force` rebuilds it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

from looper.errors import LooperError
from looper.hashing import sha256_file, tree_hash

MANIFEST = "manifest.json"
PARTIAL = ".partial"
# Files inside an artifact that are not part of its content hash (trainer state, logs).
UNHASHED = {MANIFEST, "metrics.jsonl", "trainer"}
VERSION_NAME = re.compile(r"^[0-9a-f]{6,64}$")  # a version directory's name (a short hash)


class BrokenArtifact(LooperError):
    """A version directory whose manifest is missing, unreadable or not a looper manifest."""

    def __init__(self, manifest_path: Path, reason: str):
        self.manifest_path, self.reason = manifest_path, reason
        stage = manifest_path.parent.parent.name
        super().__init__(
            f"{manifest_path}: unreadable manifest ({reason}): remove the broken version with "
            f"`looper gc --broken`, or rebuild it with `looper {stage} --force`"
        )


def is_version_dir(path: Path) -> bool:
    """A finished version's directory, or one that should be (a hash-named dir with no manifest).
    Never a run in progress or interrupted (`<version>.partial`, even once its manifest is written)
    nor a hidden leftover (`.<version>.old-<pid>`)."""
    if path.name.startswith(".") or path.name.endswith(PARTIAL):
        return False
    return path.is_dir() and ((path / MANIFEST).is_file() or bool(VERSION_NAME.match(path.name)))


def read_manifest(manifest_path: Path, *, strict: bool = True) -> dict[str, Any]:
    """The manifest as a dict, or BrokenArtifact naming the file (never a bare JSONDecodeError).

    Not `strict`: any JSON object will do (a hand-written manifest beside a bare adapter)."""
    try:
        data = manifest_path.read_bytes()
    except OSError as exc:
        raise BrokenArtifact(manifest_path, exc.strerror or type(exc).__name__) from None
    try:
        manifest = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BrokenArtifact(manifest_path, f"invalid JSON: {exc}") from None
    if (
        not isinstance(manifest, dict)
        or strict
        and not all(k in manifest for k in ("stage", "version", "hash"))
    ):
        raise BrokenArtifact(manifest_path, "not a looper manifest: no stage, version or hash")
    if strict and (wrong := shape_problem(manifest)):
        raise BrokenArtifact(manifest_path, f"badly shaped manifest: {wrong}")
    return manifest


# The manifest fields Looper reads, and their types: checked whenever a manifest is read, so a
# badly shaped one is a BrokenArtifact naming its file, never a TypeError deep in status or gc.
# Optional ones (older manifests lack `files`; `created`...) are checked when present.
_TYPES = {
    "stage": str,
    "version": str,
    "hash": str,
    "schema_version": int,
    "created": str,
    "config": dict,
    "identity": dict,
    "inputs": dict,
    "counts": dict,
    "metrics": dict,
    "files": list,
}
_REQUIRED = ("stage", "version", "hash")
_FILE_RECORD = {"path": str, "bytes": int, "sha256": str}
_INPUT_REF = {"version": str, "hash": str}


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def shape_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrongly typed in a manifest (None when every field Looper relies on is as it writes it)."""
    for key, kind in _TYPES.items():
        if (key in manifest or key in _REQUIRED) and not _is(manifest.get(key), kind):
            return f"{key} is {type(manifest.get(key)).__name__}, not {kind.__name__}"
    if not all(re.fullmatch(r"[A-Za-z0-9_.-]+", manifest[k]) for k in ("stage", "version")):
        return (
            f"stage '{manifest['stage']}' / version '{manifest['version']}' is not a stage and a version id"
        )
    for i, record in enumerate(manifest.get("files", [])):
        if not isinstance(record, dict) or not all(_is(record.get(k), t) for k, t in _FILE_RECORD.items()):
            return f"files[{i}] is not {{path: str, bytes: int, sha256: str}}"
        if record["path"].startswith("/") or ".." in Path(record["path"]).parts:
            return f"files[{i}] path {record['path']} points outside the artifact"
    for name, ref in manifest.get("inputs", {}).items():
        if not isinstance(ref, dict) or not all(_is(ref.get(k), t) for k, t in _INPUT_REF.items()):
            return f"inputs.{name} is not {{version: str, hash: str, path: str}}"
        if "path" in ref and not _is(ref["path"], str):
            return f"inputs.{name}.path is not a string"
    return None


def content_files(root: Path) -> list[Path]:
    """The files a manifest lists: everything but the manifest itself and hidden temp files."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.relative_to(root).parts[0] != MANIFEST
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def file_records(root: Path) -> list[dict[str, Any]]:
    """[{path, bytes, sha256}] of an artifact directory's content, for its manifest."""
    return [
        {"path": str(p.relative_to(root)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in content_files(root)
    ]


def problems(root: Path, manifest: dict[str, Any], *, rehash: bool = True) -> list[str]:
    """What is wrong with an artifact's files against its manifest ([] when whole).

    Each problem is 'FILE missing', 'FILE truncated or grown (N bytes, manifest says M)' or
    'FILE corrupt (sha256 differs)'. Without `rehash` only presence and sizes are checked
    (what `looper status` can afford). A manifest without a file list (older looper) is
    checked against its content hash."""
    records = manifest.get("files")
    if records is None:
        if not rehash:
            return []
        return [] if hash_tree(root) == manifest.get("hash") else ["content hash differs from the manifest's"]
    found = []
    for record in records:
        path = root / record["path"]
        if not path.is_file():
            found.append(f"{record['path']} missing")
        elif (size := path.stat().st_size) != record["bytes"]:
            found.append(
                f"{record['path']} truncated or grown ({size} bytes, manifest says {record['bytes']})"
            )
        elif rehash and sha256_file(path) != record["sha256"]:
            found.append(f"{record['path']} corrupt (sha256 differs)")
    return found


def table_reads_back(path: Path, who: str) -> bool:
    """Whether a table a previous run finished (a rollouts shard, an eval chunk) can be reused.

    A file that does not read back whole (cut off by a kill or a full disk, or damaged since)
    is reported, removed and regenerated by the caller: resume never gets stuck on it."""
    if not path.is_file():
        return False
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_table(path)
        return True
    except (pa.ArrowException, OSError) as exc:
        print(f"{who}: {path} does not read back whole ({str(exc).splitlines()[0]}): regenerating it")
        path.unlink()
        return False


def hash_tree(root: Path) -> str:
    """An artifact's content hash: its files but the manifest, trainer state and logs."""
    return tree_hash(root, UNHASHED)
