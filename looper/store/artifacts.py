"""The artifact store: versions, manifests, content hashes, atomic writes, `latest`.

Layout under the work dir (``--workdir`` / ``LOOPER_HOME``)::

    data/<stage>/<version>/            tables + manifest.json   (prepare, rollouts, eval)
    checkpoints/<stage>/<version>/     adapter + manifest.json  (sft, ppo, dpo)
    <root>/<stage>/LATEST              the version `latest` resolves to
    <root>/<stage>/<version>.partial/  a run in progress (resumable; never read as input)

A version is a short hash of the stage name, its schema version, the options that change
its output and the content hashes of its inputs, so rerunning with the same ones finds
the finished version and skips, and any changed input gives a new version.

Atomicity: a run writes into `<version>.partial/`, writes `manifest.json` last, then renames
the directory to `<version>/` in one `os.rename`. A crash at any point leaves either no
artifact or a `.partial` directory that no reader picks up, never half an artifact.

Concurrency: one run per version at a time, held by `<version>.lock` (`looper.store.locking`),
taken before the "already made?" check and released after the publish. The manifest lists
every file with its sha256, and commit checks the directory against that list before the
rename (`looper.store.integrity`), so only a complete artifact is ever published.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from looper.errors import LooperError
from looper.hashing import short_hash
from looper.store import faults, integrity
from looper.store.disk import space_for
from looper.store.integrity import hash_tree
from looper.store.locking import LOCK, ReadOnlyHome, RunLock, is_main_rank
from looper.store.provenance import environment

# Where each stage's artifacts live, and the newest row schema this code reads/writes.
MODEL_STAGES = {"sft", "ppo", "dpo", "loop"}  # loop: its final policy
# rollouts 2: arm outputs' token_ids/logprobs include the EOS that ended a completion (`tokens` does not count it);
# 4: their logprobs are tempered, log_softmax(logits / T) at the arm's temperature (3 and before: T = 1)
SCHEMA_VERSIONS = {"prepare": 1, "sft": 1, "rollouts": 4, "ppo": 1, "dpo": 1, "eval": 1, "loop": 1}
# Stable names kept for users of the old layout: checkpoints/sft_lora -> latest sft, ...
ALIASES = {"sft": "sft_lora", "ppo": "ppo_regime_w"}
MANIFEST = "manifest.json"
PARTIAL = ".partial"


# --------------------------------------------------------------------------- file IO


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temp file in the target's directory (so the final rename is atomic), mode 0644-ish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are meant to be shared
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes, *, make_parents: bool = True) -> None:
    """Write via a temp file in the same directory + fsync + rename: all or nothing.

    `make_parents=False` refuses to re-create a directory that vanished (FileNotFoundError)."""
    if not make_parents and not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} no longer exists")
    with space_for(path.parent, len(data)):
        fd, tmp = _temp_beside(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def dumps_json(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_bytes(
        path, b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in rows)
    )


def write_parquet(path: Path, rows: list[dict], schema: Any) -> None:
    """Rows -> Parquet with an explicit pyarrow schema, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    with space_for(path.parent, table.nbytes):
        fd, tmp = _temp_beside(path)
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            faults.point("shard")  # test-only (LOOPER_FAULT): killed between the write and the rename
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_rows(path: Path) -> list[dict]:
    """Rows of a .parquet or .jsonl table as dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise LooperError(
                f"{path}: unreadable table ({str(exc).splitlines()[0]}): `looper verify` lists damaged "
                "artifacts, `looper gc --broken` removes them; then rerun the stage that wrote it"
            ) from None
    if path.suffix == ".jsonl":
        with open(path, "rb") as fh:
            return [orjson.loads(line) for line in fh if line.strip()]
    raise LooperError(f"{path}: unknown table format (expected .parquet or .jsonl)")


# --------------------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class Artifact:
    """A finished artifact: its directory and its manifest."""

    stage: str
    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    def ref(self) -> dict[str, str]:
        """How a downstream manifest names this artifact in its `inputs`: its path relative to the
        home when it lives in one (`data|checkpoints/<stage>/<version>`), so a moved or copied
        LOOPER_HOME stays readable; readers find inputs by stage and version."""
        in_home = self.path.parent.name == self.stage and self.path.parent.parent.name in (
            "data",
            "checkpoints",
        )
        path = Path(*self.path.parts[-3:]) if in_home else self.path
        return {"version": self.version, "hash": self.hash, "path": str(path)}

    @classmethod
    def load(cls, path: Path) -> Artifact:
        path = Path(path).resolve()
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise LooperError(f"{path} is not a finished looper artifact (no {MANIFEST})")
        manifest = integrity.read_manifest(manifest_path)
        stage = manifest.get("stage")
        known = SCHEMA_VERSIONS.get(stage)
        if known is None or manifest.get("schema_version", 0) > known:
            raise LooperError(
                f"{manifest_path}: {stage} schema_version {manifest.get('schema_version')} is newer "
                f"than this looper reads ({known}); upgrade looper or rerun that stage"
            )
        return cls(stage, manifest["version"], path, manifest)


class Run:
    """An artifact being written: files go into `path` (the .partial dir) until `commit`."""

    def __init__(self, store: Store, stage: str, version: str, path: Path, lock: RunLock | None = None):
        self.store, self.stage, self.version, self.path, self.lock = store, stage, version, path, lock

    def commit(
        self,
        *,
        config: dict,
        inputs: dict[str, Artifact],
        identity: dict,
        counts: dict | None = None,
        metrics: dict | None = None,
        extra: dict | None = None,
        required: Iterable[str] = (),
    ) -> Artifact:
        """Hash the content, write the manifest, check the directory against it, and atomically
        publish the artifact. `required`: files that must be among the content (e.g. every shard)."""
        if not self.path.is_dir():  # never re-create it: a manifest alone would be published as whole
            raise LooperError(
                f"{self.path} vanished before commit (removed by hand or by gc?): rerun the stage"
            )
        files = integrity.file_records(self.path)
        listed = {f["path"] for f in files}
        if not files or (absent := [name for name in required if name not in listed]):
            raise LooperError(
                f"{self.path}: incomplete ({', '.join(absent) if files else 'no files'} missing), "
                "not published: rerun the stage"
            )
        manifest = {
            "stage": self.stage,
            "version": self.version,
            "schema_version": SCHEMA_VERSIONS[self.stage],
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            # the home it was run in is where the manifest lies: not recorded, so a moved home holds no stale path
            "config": {k: v for k, v in config.items() if k != "workdir"},
            "identity": identity,
            "inputs": {name: art.ref() for name, art in inputs.items()},
            "counts": counts or {},
            "metrics": metrics or {},
            "hash": hash_tree(self.path),
            "files": files,
            **environment(),
            **(extra or {}),
        }
        atomic_write_bytes(self.path / MANIFEST, dumps_json(manifest), make_parents=False)
        faults.point("commit")  # test-only (LOOPER_FAULT): killed with the manifest written, not published
        # Publish only what reads back whole: the manifest as written, every file as hashed.
        written = integrity.read_manifest(self.path / MANIFEST)
        if bad := integrity.problems(self.path, written):
            raise LooperError(
                f"{self.path}: changed while committing ({'; '.join(bad)}), not published: rerun"
            )
        final = self.store.stage_root(self.stage) / self.version
        if final.exists():  # --force, or a broken copy: the old one goes once the new one is in place
            trash = final.with_name(f".{self.version}.old-{os.getpid()}")
            os.rename(final, trash)
            os.rename(self.path, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.path, final)
        self.store.set_latest(self.stage, self.version)
        artifact = Artifact.load(final)
        self.store.unlock(self.stage, self.version)
        return artifact


class Store:
    """All artifacts under one work dir."""

    def __init__(self, workdir: str | Path, *, wait: bool = False):
        self.workdir = Path(workdir).expanduser().resolve()
        self.wait = wait  # --wait: queue behind a run of the same version instead of stopping
        self.locks: dict[tuple[str, str], RunLock] = {}

    def lock(self, stage: str, version: str, *, to_write: bool = True) -> RunLock | None:
        """Hold this version's run lock (kept until commit or process exit); None on ranks > 0, and
        in a read-only home when only looking (`to_write=False`: nothing can change there)."""
        if not is_main_rank():
            return None
        if (stage, version) not in self.locks:
            root = self.stage_root(stage)
            try:
                self.locks[stage, version] = RunLock.acquire(
                    root / f"{version}{LOCK}",
                    stage=stage,
                    target=root / f"{version}{PARTIAL}",
                    wait=self.wait,
                )
            except ReadOnlyHome:
                if to_write:
                    raise
                return None
        return self.locks[stage, version]

    def unlock(self, stage: str, version: str) -> None:
        if (held := self.locks.pop((stage, version), None)) is not None:
            held.release()

    def stage_root(self, stage: str) -> Path:
        return self.workdir / ("checkpoints" if stage in MODEL_STAGES else "data") / stage

    def relative(self, path: str | Path) -> str:
        """A path as a manifest records it: relative to the home when inside it (portable), else absolute."""
        path = Path(path).resolve()
        return str(path.relative_to(self.workdir)) if path.is_relative_to(self.workdir) else str(path)

    def version_for(self, stage: str, identity: dict, inputs: dict[str, Any]) -> str:
        """Deterministic version id from what determines the output.

        `inputs` maps names to `Artifact`s or to content-hash strings (e.g. a source file).
        """
        input_hashes = {k: (v.hash if isinstance(v, Artifact) else v) for k, v in inputs.items()}
        return short_hash(
            {"stage": stage, "schema": SCHEMA_VERSIONS[stage], "identity": identity, "inputs": input_hashes}
        )

    def find(self, stage: str, version: str) -> Artifact | None:
        path = self.stage_root(stage) / version
        return Artifact.load(path) if (path / MANIFEST).is_file() else None

    def input(self, stage: str, ref: dict[str, str]) -> Artifact:
        """An artifact a manifest names as an input (`ref`: its version and home-relative path):
        by version in this home, else at the recorded path (an input kept outside the home)."""
        return self.find(stage, ref["version"]) or Artifact.load(self.workdir / ref["path"])

    def reuse(self, stage: str, version: str, force: bool) -> Artifact | None:
        """The finished artifact of exactly this version, made `latest` again; None if absent or forced.

        This is how every stage skips a rerun that would produce what already exists. It takes the
        version's run lock first (kept when None is returned: this process is about to build it),
        so a run that waited behind another finds that one's artifact instead of redoing it.
        With force the old copy is not even read: a broken one is simply rebuilt; a copy with a file
        missing or resized (a cheap check; `looper verify` re-hashes) is rebuilt too."""
        self.lock(stage, version, to_write=False)
        existing = None if force else self.find(stage, version)
        if existing is None:
            return None
        if damaged := integrity.problems(existing.path, existing.manifest, rehash=False):
            print(f"{stage} {version}: the finished copy is damaged ({'; '.join(damaged)}): rebuilding it")
            return None  # commit replaces it once the new copy is whole
        self.unlock(stage, version)
        self.set_latest(stage, version)
        return existing

    def latest(self, stage: str) -> str | None:
        pointer = self.stage_root(stage) / "LATEST"
        return pointer.read_text().strip() if pointer.is_file() else None

    def set_latest(self, stage: str, version: str) -> None:
        root = self.stage_root(stage)
        pointer = root / "LATEST"
        # Rewrite only on change: Make compares the pointer's mtime to decide staleness.
        if not pointer.is_file() or pointer.read_text().strip() != version:
            atomic_write_bytes(pointer, version.encode() + b"\n")
        link = root.parent / ALIASES.get(stage, "")
        if stage in ALIASES and not (link.is_symlink() and os.readlink(link) == str(Path(stage) / version)):
            tmp = root.parent / f".{ALIASES[stage]}.tmp-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            os.symlink(Path(stage) / version, tmp)
            os.replace(tmp, link)

    def resolve(self, stage: str, ref: str | None = None) -> Artifact:
        """`None`/'latest' -> the latest version; a version id; or a path to an artifact dir."""
        if ref in (None, "", "latest"):
            version = self.latest(stage)
            if version is None:
                raise LooperError(
                    f"no {stage} artifact under {self.workdir}: run `looper {stage}` first"
                    + (" (or pass --workdir)" if stage == "prepare" else "")
                )
            ref = version
        if os.sep in ref or ref.startswith((".", "~")):  # a path, not a version id
            artifact = Artifact.load(Path(ref).expanduser())
            if artifact.stage != stage:
                raise LooperError(f"{ref} is a {artifact.stage} artifact, expected {stage}")
            return artifact
        candidate = self.stage_root(stage) / ref
        if not (candidate / MANIFEST).is_file():
            raise LooperError(f"no {stage} version '{ref}' under {self.stage_root(stage)}")
        return Artifact.load(candidate)

    def begin(self, stage: str, version: str, *, resume: bool = False) -> Run:
        """Start writing `version`; with resume, keep what an interrupted run left."""
        lock = self.lock(stage, version)
        path = self.stage_root(stage) / f"{version}{PARTIAL}"
        if path.exists() and not resume:
            shutil.rmtree(path)
        for stray in path.glob(".*.tmp"):  # a write killed before its rename: never part of the artifact
            stray.unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        return Run(self, stage, version, path, lock)
