"""What `looper status` shows: every artifact, its inputs, and whether it is stale.

An artifact is stale when an input it was built from is no longer the latest version of
that input's stage (for example sft trained on a prepare version that has since been
replaced): rerunning the stage would build something new.
"""

from __future__ import annotations

from pathlib import Path

from looper.artifacts import MANIFEST, SCHEMA_VERSIONS, Artifact, Store
from looper.errors import LooperError


def collect(workdir: str | Path) -> list[dict]:
    store = Store(workdir)
    rows = []
    for stage in SCHEMA_VERSIONS:
        root = store.stage_root(stage)
        if not root.is_dir():
            continue
        latest = store.latest(stage)
        for path in sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()):
            try:
                artifact = Artifact.load(path)
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
                }
            )
    return rows
