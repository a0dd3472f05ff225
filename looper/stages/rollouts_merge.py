"""`looper rollouts merge V1 V2 ...`: one version from the artifacts of `--shard 1/n` ... `n/n`, the
version an unsharded run would get (rollouts on several boxes, combined on one).
"""

from __future__ import annotations

from looper.errors import LooperError
from looper.rewards.summary import summarize
from looper.stages import StageResult
from looper.store.artifacts import Store, read_rows

STAGE = "rollouts"


def merge(parts: list[str], *, workdir: str, force: bool = False) -> StageResult:
    """One version from the artifacts of `--shard 1/n` ... `n/n`: the version an unsharded run would get."""
    import shutil

    store = Store(workdir)
    artifacts = [store.resolve(STAGE, p) for p in parts]
    shards = sorted((a.manifest["shard"]["index"], a.manifest["shard"]["count"]) for a in artifacts)
    count = shards[0][1]
    if [i for i, _ in shards] != list(range(1, count + 1)) or any(n != count for _, n in shards):
        raise LooperError(
            f"merge needs exactly the shards 1/{count} ... {count}/{count} once each; got "
            + ", ".join(f"{i}/{n}" for i, n in shards)
        )
    strip = lambda ident: {k: v for k, v in ident.items() if k != "shard"}  # noqa: E731
    if (
        any(strip(a.manifest["identity"]) != strip(artifacts[0].manifest["identity"]) for a in artifacts)
        or len({tuple(sorted((k, v["hash"]) for k, v in a.manifest["inputs"].items())) for a in artifacts})
        != 1
    ):
        raise LooperError("merge: these shards come from different settings or inputs (prepare, policy)")
    if len({a.manifest.get("schema_version", 1) for a in artifacts}) > 1:
        raise LooperError("merge: these shards were written by looper versions with different row schemas")
    stage_identity = artifacts[0].manifest["identity"] | {"shard": "1/1"}
    inputs = {  # by version in this home (paths in manifests are home-relative); else the recorded path
        name: store.input(name, ref) for name, ref in artifacts[0].manifest["inputs"].items()
    }
    version = store.version_for(STAGE, stage_identity, inputs)
    if existing := store.reuse(STAGE, version, force):
        return StageResult.up_to_date(existing)
    run_ = store.begin(STAGE, version)
    for artifact in artifacts:
        for shard_file in artifact.path.glob("shard-*.parquet"):
            shutil.copy2(shard_file, run_.path / shard_file.name)
    all_rows = [r for f in sorted(run_.path.glob("shard-*.parquet")) for r in read_rows(f)]
    first = artifacts[0].manifest
    config = first["config"] | {"shard": "1/1"}
    artifact = run_.commit(
        config=config,
        inputs=inputs,
        identity=stage_identity,
        counts={
            "questions": len(all_rows),
            "shards": len(list(run_.path.glob("shard-*.parquet"))),
            "arms": first["counts"]["arms"],
        },
        metrics=summarize(all_rows, [a["name"] for a in first["sampling"]["arms"]]),
        extra={
            k: first[k]
            for k in ("base_model", "policy", "sampling", "generated_by", "rewards", "allocation")
            if k in first
        }
        | {
            "shard": {"index": 1, "count": 1, "merged_from": [a.version for a in artifacts]},
            "schema_version": first.get("schema_version", 1),  # the rows as the shards stored them
        },
    )
    return StageResult.from_artifact(artifact)
