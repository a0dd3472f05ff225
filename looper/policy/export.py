"""`looper export`: a trained policy as a standalone merged model directory (adapter folded into the base)."""

from __future__ import annotations

import os
from pathlib import Path

from looper.errors import LooperError
from looper.policy import models, policies
from looper.store.artifacts import MANIFEST, Artifact, Store, dumps_json


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
