"""`looper export` (adapter merged into a standalone model) and `looper gc` (free disk).

looper export --model ppo --out exported/ppo-8b      # serve with vLLM or transformers
looper gc --keep 2                                    # keep the 2 newest versions per stage
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from looper import models, policies
from looper.artifacts import MANIFEST, PARTIAL, SCHEMA_VERSIONS, Artifact, Store, dumps_json
from looper.errors import LooperError


def export(*, name: str, out: str, workdir: str, base_model: str | None = None) -> Path:
    """Merge an adapter (sft, ppo, dpo, or a path) into its base; write a plain HF model directory."""
    store = Store(workdir)
    if name in policies.ADAPTER_STAGES:
        if store.latest(name) is None:
            raise LooperError(
                f"no {name} adapter under {store.workdir}: run `{policies.ADAPTER_STAGES[name]}` first"
            )
        adapter_dir = store.resolve(name).path
    else:
        adapter_dir = Path(name).expanduser().resolve()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise LooperError(f"--model {name}: not sft/ppo/dpo nor a directory with an adapter_config.json")
    manifest = Artifact.load(adapter_dir).manifest if (adapter_dir / MANIFEST).is_file() else {}
    spec = base_model or manifest.get("base_model", {}).get("spec")
    if spec is None:
        raise LooperError(f"{adapter_dir}: no manifest names its base model: pass --base-model")
    base = models.resolve_model(spec)
    target = Path(out).expanduser().resolve()
    if target.exists():
        raise LooperError(f"--out {target} exists: choose a new directory (nothing was overwritten)")
    model = models.attach_adapter(models.load_model(base, quant="none"), adapter_dir, base, trainable=False)
    merged = model.merge_and_unload()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    merged.save_pretrained(tmp, safe_serialization=True)
    models.load_tokenizer(base).save_pretrained(tmp)
    (tmp / "looper_manifest.json").write_bytes(
        dumps_json({"exported_from": str(adapter_dir), "base_model": spec, "adapter_manifest": manifest})
    )
    os.replace(tmp, target)
    return target


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
        found = (
            [Artifact.load(p) for p in root.iterdir() if (p / MANIFEST).is_file()] if root.is_dir() else []
        )
        # newest first; `created` has one-second resolution, the manifest's mtime breaks ties
        artifacts[stage] = sorted(
            found,
            key=lambda a: (a.manifest.get("created", ""), (a.path / MANIFEST).stat().st_mtime_ns),
            reverse=True,
        )
    kept = {(s, a.version) for s, arts in artifacts.items() for a in arts[:keep]}
    kept |= {(s, store.latest(s)) for s in artifacts if store.latest(s)}
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
    if partials:
        doomed += [p for s in artifacts for p in store.stage_root(s).glob(f"*{PARTIAL}")]
    freed = sum(_size(p) for p in doomed)
    if not dry_run:
        for path in doomed:
            shutil.rmtree(path)
    return doomed, freed
