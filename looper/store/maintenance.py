"""`looper gc` (free disk) and `looper verify` (re-hash artifacts against their manifests);
`looper export` lives in `looper.policy.export`.

looper gc --keep 2                                    # keep the 2 newest versions per stage
looper gc --broken                                    # remove corrupt versions, dangling pointers
looper verify rollouts                                # every byte of every rollouts version
"""

from __future__ import annotations

import shutil
from pathlib import Path

from looper.errors import LooperError
from looper.store import integrity
from looper.store.artifacts import ALIASES, MANIFEST, PARTIAL, SCHEMA_VERSIONS, Artifact, Store
from looper.store.locking import LOCK, RunLock, held_inputs, pid_alive


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def gc(*, workdir: str, keep: int, partials: bool = False, dry_run: bool = False) -> tuple[list[Path], int]:
    """Remove all but the `keep` newest versions of each stage, never one a kept artifact (or
    `latest`) depends on; with `partials`, also interrupted runs' .partial dirs (their resume state)."""
    if keep < 1:
        raise LooperError("--keep must be at least 1 (the latest version is always kept)")
    store = Store(workdir)
    artifacts = {}
    for stage in SCHEMA_VERSIONS:
        root = store.stage_root(stage)
        # an unreadable manifest stops gc with BrokenArtifact (naming it and `looper gc --broken`):
        # what such a version was built from is unknown, so nothing could be removed safely
        found = (
            [
                Artifact.load(p)
                for p in root.iterdir()
                if integrity.is_version_dir(p) and (p / MANIFEST).is_file()
            ]
            if root.is_dir()
            else []
        )
        # newest first; `created` has one-second resolution, the manifest's mtime breaks ties
        artifacts[stage] = sorted(
            found,
            key=lambda a: (a.manifest.get("created", ""), (a.path / MANIFEST).stat().st_mtime_ns),
            reverse=True,
        )
    kept = {(s, a.version) for s, arts in artifacts.items() for a in arts[:keep]}
    kept |= {(s, store.latest(s)) for s in artifacts if store.latest(s)}
    kept |= inputs_of_live_runs(store)
    # keep what kept artifacts were built from, transitively (eval -> ppo -> rollouts -> sft -> prepare)
    by_key = {(s, a.version): a for s, arts in artifacts.items() for a in arts}
    frontier = list(kept)
    while frontier:
        artifact = by_key.get(frontier.pop())
        for stage, ref in (artifact.manifest.get("inputs", {}) if artifact else {}).items():
            if (stage, ref["version"]) not in kept:
                kept.add((stage, ref["version"]))
                frontier.append((stage, ref["version"]))
    doomed = [a.path for key, a in by_key.items() if key not in kept]
    freed = sum(_size(p) for p in doomed)
    if not dry_run:
        for path in doomed:
            shutil.rmtree(path)
    if partials:
        gone, size = remove_idle_partials(store, dry_run)
        strays, stray_size = remove_stray_temp_files(store, dry_run)
        doomed, freed = doomed + gone + strays, freed + size + stray_size
    return doomed, freed


def remove_stray_temp_files(store: Store, dry_run: bool) -> tuple[list[Path], int]:
    found = store.stray_temp_files(SCHEMA_VERSIONS)
    freed = sum(p.lstat().st_size for p in found)
    for path in found:
        print(f"stray {path}: a temp file of a killed write")
        if not dry_run:
            path.unlink(missing_ok=True)
    return found, freed


def inputs_of_live_runs(store: Store) -> set[tuple[str, str]]:
    """(stage, version) of every artifact a running stage reads, as its held lock file names them."""
    reads = set()
    for stage in SCHEMA_VERSIONS:
        root = store.stage_root(stage)
        for lock in sorted(root.glob(f"*{LOCK}")) if root.is_dir() else []:
            for ref in held_inputs(lock) or []:
                name, _, version = ref.partition("/")
                reads.add((name, version))
    return reads


def remove_idle_partials(store: Store, dry_run: bool) -> tuple[list[Path], int]:
    """Interrupted runs' .partial dirs, each removed under its run lock: one a live run holds is
    left alone (said so), and no run can start on it while it goes."""
    removed, freed = [], 0
    for stage in SCHEMA_VERSIONS:
        root = store.stage_root(stage)
        for path in sorted(root.glob(f"*{PARTIAL}")) if root.is_dir() else []:
            version = path.name.removesuffix(PARTIAL)
            size = _remove_under_lock(root, stage, version, path, dry_run, busy="using it now")
            if size is not None:
                freed += size
                removed.append(path)
    return removed, freed


def _remove_under_lock(
    root: Path, stage: str, version: str, path: Path, dry_run: bool, busy: str
) -> int | None:
    """Remove `path` (a version's dir or its .partial) holding the version's run lock, so no run
    starts on it while it goes; its size, or None when a live run holds the lock (said so)."""
    try:
        lock = RunLock.acquire(root / f"{version}{LOCK}", stage=stage, target=path, wait=False)
    except LooperError:
        print(f"kept {path}: a looper {stage} run is {busy}")
        return None
    try:
        size = _size(path)
        if not dry_run:
            shutil.rmtree(path)
        return size
    finally:
        lock.release()


def broken_versions(store: Store, stages: list[str], version: str | None = None, *, rehash: bool = True):
    """(stage, path, problems) of every version dir checked: [] problems when whole."""
    for stage in stages:
        root = store.stage_root(stage)
        paths = [root / version] if version else sorted(root.iterdir()) if root.is_dir() else []
        for path in paths:
            if version is None and not integrity.is_version_dir(path):
                continue
            if not (path / MANIFEST).is_file():
                yield stage, path, [f"{MANIFEST} missing" if path.is_dir() else "no such version"]
                continue
            try:
                manifest = integrity.read_manifest(path / MANIFEST)
            except integrity.BrokenArtifact as exc:
                yield stage, path, [f"{MANIFEST} unreadable ({exc.reason})"]
                continue
            yield stage, path, integrity.problems(path, manifest, rehash=rehash)


def verify(*, workdir: str, stage: str | None = None, version: str | None = None) -> list[dict]:
    """Every finished artifact (of `stage`, or that one `version`) re-hashed against its manifest."""
    if stage is not None and stage not in SCHEMA_VERSIONS:
        raise LooperError(f"looper verify {stage}: not a stage (one of {', '.join(SCHEMA_VERSIONS)})")
    if version is not None and version == "latest":
        version = Store(workdir).latest(stage)
        if version is None:
            raise LooperError(f"no {stage} artifact under {Store(workdir).workdir}")
    stages = [stage] if stage else list(SCHEMA_VERSIONS)
    return [
        {"stage": s, "version": p.name, "path": str(p), "problems": found}
        for s, p, found in broken_versions(Store(workdir), stages, version)
    ]


def gc_broken(*, workdir: str, dry_run: bool = False) -> tuple[list[Path], int]:
    """Remove what cannot be used: versions whose manifest is missing or unreadable or whose files
    do not match it (re-hashed), leftovers of interrupted publishes, and LATEST pointers (and
    their checkpoints/ aliases) that name no version. Each version goes under its run lock."""
    store = Store(workdir)
    removed, freed = [], 0
    for stage, path, found in broken_versions(store, list(SCHEMA_VERSIONS)):
        if not found:
            continue
        print(f"broken {path}: {'; '.join(found)}")
        size = _remove_under_lock(
            store.stage_root(stage), stage, path.name, path, dry_run, busy="rebuilding it now"
        )
        if size is not None:
            freed += size
            removed.append(path)
    for stage in SCHEMA_VERSIONS:
        root = store.stage_root(stage)
        # a publish killed between its two renames leaves `.<version>.old-<pid>` behind
        for trash in sorted(root.glob(".*.old-*")) if root.is_dir() else []:
            if pid_alive(int(trash.name.rsplit("-", 1)[1])):
                continue  # that publish is in progress
            freed += _size(trash)
            removed.append(trash)
            if not dry_run:
                shutil.rmtree(trash)
        latest = store.latest(stage)
        if latest is not None and not (root / latest / MANIFEST).is_file():
            removed.append(root / "LATEST")
            if not dry_run:
                (root / "LATEST").unlink()
                if stage in ALIASES:
                    (root.parent / ALIASES[stage]).unlink(missing_ok=True)
    strays, stray_size = remove_stray_temp_files(store, dry_run)
    return removed + strays, freed + stray_size
