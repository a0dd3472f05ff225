"""What `looper status` shows: every artifact, its inputs, and whether it is stale; plus what
needs attention: corrupt artifacts, unreadable manifests, interrupted runs, a dangling LATEST.

An artifact is stale when an input it was built from is no longer the latest version of
that input's stage (for example sft trained on a prepare version that has since been
replaced): rerunning the stage would build something new. It is corrupt when a file its
manifest lists is missing or has another size (status compares sizes only; `looper verify`
re-hashes every byte). A `<version>.partial` directory is an interrupted run (resumable by
the same command) or, while its lock is held, a run in progress.
"""

from __future__ import annotations

from pathlib import Path

from looper.errors import LooperError
from looper.store import integrity
from looper.store.artifacts import MANIFEST, PARTIAL, SCHEMA_VERSIONS, Artifact, Store
from looper.store.locking import LOCK, describe_holder, is_locked


def collect(workdir: str | Path) -> list[dict]:
    store = Store(workdir)
    rows = []
    for stage in SCHEMA_VERSIONS:
        root = store.stage_root(stage)
        if not root.is_dir():
            continue
        latest = store.latest(stage)
        for path in sorted(p for p in root.iterdir() if integrity.is_version_dir(p)):
            if not (path / MANIFEST).is_file():
                rows.append(problem_row(stage, path, "unreadable", f"no {MANIFEST}", latest, path / MANIFEST))
                continue
            try:
                artifact = Artifact.load(path)
            except integrity.BrokenArtifact as exc:
                rows.append(problem_row(stage, path, "unreadable", exc.reason, latest, path / MANIFEST))
                continue
            except LooperError:
                continue  # written by a newer looper: not ours to judge
            inputs = artifact.manifest.get("inputs", {})
            stale = [name for name, ref in inputs.items() if store.latest(name) not in (None, ref["version"])]
            rows.append(
                {
                    "stage": stage,
                    "version": artifact.version,
                    "path": str(artifact.path),
                    "created": artifact.manifest.get("created"),
                    "latest": artifact.version == latest,
                    "inputs": {name: ref["version"] for name, ref in inputs.items()},
                    "stale": stale,
                    "state": "ok",
                    "problems": integrity.problems(artifact.path, artifact.manifest, rehash=False),
                }
            )
            if rows[-1]["problems"]:
                rows[-1]["state"] = "corrupt"
        for path in sorted(root.glob(f"*{PARTIAL}")):
            version = path.name.removesuffix(PARTIAL)
            lock = root / f"{version}{LOCK}"
            running = is_locked(lock)
            if running:
                reason = f"running ({describe_holder(lock)})"
            elif integrity.content_files(path):
                reason = "resumable: rerun the same command"
            else:  # e.g. a model that failed to load: nothing was saved that a rerun could continue
                reason = "nothing saved yet (a rerun starts over; `looper gc --partials` removes it)"
            rows.append(problem_row(stage, path, "running" if running else "interrupted", reason, latest))
        if latest is not None and not (root / latest / MANIFEST).is_file():
            rows.append(
                problem_row(
                    stage, root / latest, "dangling", "LATEST names a version that is not there", latest
                )
            )
    return rows


def problem_row(stage: str, path: Path, state: str, reason: str, latest: str | None, manifest=None) -> dict:
    version = path.name.removesuffix(PARTIAL)
    return {
        "stage": stage,
        "version": version,
        "path": str(manifest or path),
        "created": None,
        "latest": version == latest,
        "inputs": {},
        "stale": [],
        "state": state,
        "problems": [reason],
    }


def format_row(row: dict) -> str:
    """One line of `looper status`."""
    flag = "latest" if row["latest"] else ""
    if row["state"] == "ok":
        stale = "STALE (" + ", ".join(row["stale"]) + ")" if row["stale"] else "ok"
        inputs = ", ".join(f"{k}={v}" for k, v in row["inputs"].items()) or "-"
        return f"{row['stage']:<9} {row['version']}  {row['created']}  {stale:<8} {flag:<6} inputs: {inputs}"
    label = {
        "corrupt": "CORRUPT",
        "unreadable": "UNREADABLE MANIFEST",
        "interrupted": "INTERRUPTED",
        "running": "RUNNING",
        "dangling": "DANGLING LATEST",
    }[row["state"]]
    advice = {
        "corrupt": "; `looper verify` checks every byte, `looper gc --broken` removes it",
        "unreadable": "; `looper gc --broken` removes it, or rebuild with --force",
        "dangling": "; rerun the stage, or `looper gc --broken` drops the pointer",
    }.get(row["state"], "")
    return f"{row['stage']:<9} {row['version']}  {label} {flag} {row['path']}: {'; '.join(row['problems'])}{advice}"
