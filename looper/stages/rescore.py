"""`looper rollouts rescore`: a new rollouts version with other reward weights, without generating.

    looper rollouts rescore                               # the latest rollouts, [rewards] of --config
    looper rollouts rescore 3f2a9c --weights correctness=2.0,length=0

Every reward of `looper.rewards.registry` is a pure function of what rollouts store (completions,
answers, lengths, the question's Regime W scores), so new weights or parameters are a pass
over the stored rows: seconds, not a GPU-hour. The reward settings are those of the source
artifact, overridden by the pipeline file's `[rewards]` keys and then by `--weights`. The new
version is the one `looper rollouts` would get with those settings (same identity and
inputs), and its manifest names the source (`rescored_from`); settings equal to the
source's give the source's version: up to date, nothing written. Schema-2 rollouts (before
components were stored) are rescored too: their components are computed from their rows.
"""

from __future__ import annotations

import dataclasses

from looper.errors import LooperError
from looper.rewards import registry
from looper.rewards.summary import ROW_SCHEMA, summarize
from looper.stages import StageResult
from looper.store.artifacts import Store, read_rows, write_parquet

STAGE = "rollouts"


def source_spec(manifest: dict) -> registry.RewardSpec:
    """The reward settings an artifact was scored with (schema 2: the reference recipe, its blend and s_wm weights)."""
    if "rewards" in manifest:
        return registry.RewardSpec.from_dict(manifest["rewards"])
    config = manifest.get("config", {})
    scoring = {k: config[k] for k in ("coherence_blend", "w_end", "w_path", "w_cf") if k in config}
    return (
        registry.resolve({}, None)
        if not scoring
        else registry.RewardSpec(
            registry.resolve({}, None).weights, dataclasses.replace(registry.RewardParams(), **scoring)
        )
    )


def overlay(spec: registry.RewardSpec, table: dict | None, weights: str | None) -> registry.RewardSpec:
    """`spec` with the keys `table` names, then `--weights`, replacing its own."""
    table = dict(table or {})
    registry.settings(table)  # checks names and ranges
    param_names = {f.name for f in dataclasses.fields(registry.RewardParams)}
    new_weights = (
        dict(spec.weights)
        | {k: float(v) for k, v in table.items() if k in registry.NAMES}
        | registry.parse_weights(weights)
    )
    params = dataclasses.replace(spec.params, **{k: v for k, v in table.items() if k in param_names})
    return registry.RewardSpec(new_weights, params)


def run(
    source: str | None, *, workdir: str, weights: str | None, table: dict | None, force: bool
) -> StageResult:
    store = Store(workdir)
    src = store.resolve(STAGE, source)
    if src.manifest.get("schema_version", 1) < 2:
        raise LooperError(f"rollouts {src.version} are schema 1 (no EOS stored): rerun `looper rollouts`")
    if src.manifest.get("shard", {}).get("count", 1) > 1:
        raise LooperError(
            f"rollouts {src.version} are one shard of several: `looper rollouts merge` them first"
        )
    spec = overlay(source_spec(src.manifest), table, weights)
    if src.manifest.get("sampling", {}).get("cf_skipped") and registry.reads_s_cf(
        [n for n, w in spec.weights.items() if w], spec.params
    ):
        raise LooperError(
            f"rollouts {src.version} skipped their s_cf re-asks, so no reward can weigh s_cf: "
            "set counterfactual/coherence weights to 0 (or w_cf = 0), or rerun `looper rollouts`"
        )
    stage_identity = src.manifest["identity"] | {"rewards": spec.as_dict()}
    inputs = {  # by version in this home (paths in manifests are home-relative); else the recorded path
        name: store.input(name, ref) for name, ref in src.manifest["inputs"].items()
    }
    version = store.version_for(STAGE, stage_identity, inputs)
    if existing := store.reuse(STAGE, version, force):
        return StageResult.up_to_date(existing)

    run_ = store.begin(STAGE, version)
    all_rows = []
    for shard in sorted(src.path.glob("shard-*.parquet")):
        rows = [row | registry.row_rewards(row, spec) for row in read_rows(shard)]
        write_parquet(run_.path / shard.name, rows, ROW_SCHEMA)
        all_rows += rows
    first = src.manifest
    artifact = run_.commit(
        config=first["config"] | {"weights": weights, "rewards": table},
        inputs=inputs,
        identity=stage_identity,
        counts=first["counts"],
        metrics=summarize(all_rows, [a["name"] for a in first["sampling"]["arms"]]),
        extra={
            k: first[k]
            for k in ("base_model", "policy", "sampling", "generated_by", "shard", "allocation")
            if k in first
        }
        # the rows keep their log-probs as stored: a rescore of older rollouts stays their schema
        | {
            "rewards": spec.as_dict(),
            "rescored_from": src.version,
            "schema_version": first.get("schema_version", 1),
        },
    )
    return StageResult.from_artifact(artifact)
