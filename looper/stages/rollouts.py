"""`looper rollouts`: sample every arm on each train question, score the set with Regime W.

    looper rollouts --arms 8                       # first 500 train questions, latest sft policy
    looper rollouts --policy base --limit 100      # before any sft
    looper rollouts --shard 2/4                    # this box does chunks 2, 6, 10, ... of four boxes
    looper rollouts merge V1 V2 V3 V4              # combine the boxes' artifacts into one version

For each question, every arm (prompt style x temperature, `looper.regime_w.arms`) writes a
solution; a few arms are asked again on a perturbed question for s_cf. The scores
(s_end, s_path, s_cf, s_wm) and rewards (the question reward and one per arm) are pure
functions of those outputs (`looper.regime_w.scoring`, `.reward`). Each completion keeps
its prompt, token ids and log-probs at the arm's temperature, so `looper ppo` can replay it exactly and
use the log-probs as its behaviour policy.

Questions are processed in chunks of `--shard-size`; each finished chunk is written as
`shard-NNNNN.parquet` at once, so an interrupted run resumes at the first missing chunk,
with no question missing or twice (a shard that does not read back whole, cut off by a kill
or a full disk, is regenerated). Chunk seeds derive from the chunk index, so a resumed
run samples what an uninterrupted one would have. The commit refuses to publish unless
every shard of this run is there.
"""

from __future__ import annotations

import time

import orjson

from looper.config import RolloutsConfig
from looper.errors import LooperError
from looper.policy import models, policies
from looper.regime_w import bandit
from looper.regime_w.arms import select_arms
from looper.rewards.summary import ROW_SCHEMA, summarize
from looper.stages import StageResult
from looper.stages.rollouts_rows import (
    cf_skip,
    chunk_requests,
    reward_spec,
    rollout_chunk,
    rollouts_identity,
)
from looper.store.artifacts import Store, read_rows, write_parquet
from looper.store.integrity import table_reads_back

STAGE = "rollouts"


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        index = count = 0
    if not 1 <= index <= count:
        raise LooperError(f"--shard {spec}: write i/n with 1 <= i <= n, e.g. 1/1 or 2/4")
    return index, count


def run(config: RolloutsConfig) -> StageResult:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    store = Store(config.workdir, wait=config.wait)
    prepare = store.resolve("prepare", config.prepare)
    if config.split not in ("train", "dev"):  # test and the --extra-eval splits are for evaluation only
        raise LooperError(
            f"--split {config.split}: rollouts feed training, so they never read the test split "
            "or an evaluation split (use train or dev)"
        )
    shard_index, shard_count = parse_shard(config.shard)
    arms = select_arms(config.arms, config.arm_file)
    arm_names = {a.name: a for a in arms}
    cf_names = [n.strip() for n in config.cf_arms.split(",") if n.strip()]
    if unknown := [n for n in cf_names if n not in arm_names]:
        raise LooperError(
            f"--cf-arms: {', '.join(unknown)} not among the arms in use ({', '.join(arm_names)})"
        )
    cf_skipped = cf_skip(cf_names, reward_spec(config))
    cf_names = [] if cf_skipped else cf_names
    cf_arms = [arm_names[n] for n in cf_names]
    learning = config.arm_allocation != "uniform" and config.arm_prior
    prior = store.resolve(STAGE, config.arm_prior) if learning else None
    allocation = bandit.allocate(
        config.arm_allocation,
        list(arm_names),
        config.arm_budget or len(arms),
        config.arm_floor,
        prior.manifest.get("metrics", {}).get("arm_reward_stats") if prior else None,
        seed=config.seed,
    )
    arms_of = lambda row: [arm_names[n] for n in allocation.arms_for(row["id"], config.seed)]  # noqa: E731
    if config.arm_allocation != "uniform":
        print(f"rollouts: {config.arm_allocation} allocation per question: " + ", ".join(
            f"{a} {s * allocation.budget:.2f}" for a, s in allocation.shares.items()))  # fmt: skip

    base = models.resolve_model(config.model)
    try:
        policy = policies.resolve_policy(
            config.policy, store=store, base=base, allow_base_mismatch=config.allow_base_mismatch
        )
    except LooperError as exc:
        hint = " (or pass --policy base to roll out the base model)" if config.policy == "sft" else ""
        raise LooperError(f"{exc}{hint}") from None
    weights = policies.generation_weights(config.backend, policy, config.dtype, sampling=True)
    stage_identity = rollouts_identity(config) | {
        "model": base.identity,
        "policy": policy.identity(),
        "arms": [vars(a) for a in arms],
    }
    if config.dtype == "auto" and weights["dtype"] == "bfloat16" and not models.has_cuda():
        stage_identity["dtype"] = "bfloat16"  # 'auto' sampled in float32 on a CPU before: a new version
    # the policy's adapter is an input too: a retrained sft makes these rollouts stale
    inputs = {"prepare": prepare} | ({policy.artifact.stage: policy.artifact} if policy.artifact else {})
    inputs |= {"arm_prior": prior} if prior else {}  # the allocation is learned from it
    version = store.version_for(STAGE, stage_identity, inputs)
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)

    split_path = prepare.path / f"{config.split}.parquet"
    if not split_path.is_file():
        raise LooperError(
            f"--split {config.split}: no such split in prepare {prepare.version} (train or dev)"
        )
    rows = read_rows(split_path)[config.offset :]
    rows = rows[: config.limit] if config.limit is not None else rows
    if not rows:
        raise LooperError(f"no questions in {config.split} from offset {config.offset}")
    chunks = [rows[i : i + config.shard_size] for i in range(0, len(rows), config.shard_size)]
    mine = [j for j in range(len(chunks)) if j % shard_count == shard_index - 1]

    partial = store.partial_path(STAGE, version)  # made by store.begin once the model has loaded
    todo = [
        j for j in mine if config.force or not table_reads_back(partial / f"shard-{j:05d}.parquet", STAGE)
    ]
    if len(todo) < len(mine):
        print(f"rollouts: resuming {partial}: {len(mine) - len(todo)} of {len(mine)} chunks already done")
    generator = tokenizer = None
    if todo:
        generator, tokenizer = policies.load_generator(
            policy,
            backend=config.backend,
            batch_size=config.batch_size,
            trust_remote_code=config.trust_remote_code,
            scheduler=config.scheduler,
            dtype=config.dtype,
            sampling=True,
            options=config,
            # vLLM sizes its context for the longest prompt of the chunks still to do
            prompts=lambda tok: [
                p for j in todo for p in chunk_requests(chunks[j], arms_of, cf_arms, tok)[0]
            ],
        )
    run_ = store.begin(STAGE, version, resume=not config.force)
    if todo:
        columns = [
            TextColumn("rollouts"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("questions"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
        ]
        with Progress(*columns, transient=False) as progress:
            done_questions = sum(len(chunks[j]) for j in mine) - sum(len(chunks[j]) for j in todo)
            task = progress.add_task(
                "rollouts", total=sum(len(chunks[j]) for j in mine), completed=done_questions, rate=""
            )
            for j in todo:

                def on_progress(done, tokens, start=time.perf_counter()):
                    # rates of the chunk in flight: completions are questions x (arms + s_cf re-asks)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    per_question = allocation.budget + len(cf_arms)
                    progress.update(
                        task,
                        rate=f"{done / per_question / elapsed:.2f} questions/s, {tokens / elapsed:.0f} tok/s",
                    )

                scored = rollout_chunk(
                    chunks[j],
                    arms_of,
                    cf_arms,
                    generator,
                    tokenizer,
                    config,
                    seed=config.seed * 100_003 + j,
                    on_progress=on_progress,
                    policy=policy.ref,
                )
                write_parquet(run_.path / f"shard-{j:05d}.parquet", scored, ROW_SCHEMA)
                progress.advance(task, len(chunks[j]))

    all_rows = [r for j in mine for r in read_rows(run_.path / f"shard-{j:05d}.parquet")]
    summary = summarize(all_rows, [a.name for a in arms])
    artifact = run_.commit(
        config=orjson.loads(orjson.dumps(vars(config))),
        inputs=inputs,
        identity=stage_identity,
        counts={"questions": len(all_rows), "shards": len(mine), "arms": len(arms)},
        required=[f"shard-{j:05d}.parquet" for j in mine],
        metrics=summary,
        extra={
            "base_model": {"spec": base.spec, "identity": base.identity},
            "policy": {
                "name": policy.name,
                "adapter_path": store.relative(policy.adapter) if policy.adapter else None,
                "base_mismatch_allowed": policy.base_mismatch,
                **policy.identity(),
            },
            "generated_by": weights,
            "rewards": reward_spec(config).as_dict(),
            "allocation": allocation.as_dict() | {"prior": prior.version if prior else None},
            "sampling": {
                "arms": [vars(a) for a in arms],
                "cf_arms": cf_names,
                **({"cf_skipped": cf_skipped} if cf_skipped else {}),
                "max_new_tokens": config.max_new_tokens,
                "seed": config.seed,
            },
            "shard": {
                "index": shard_index,
                "count": shard_count,
                "chunks": mine,
                "total_chunks": len(chunks),
            },
        },
    )
    return StageResult.from_artifact(artifact)
