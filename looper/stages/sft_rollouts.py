"""`looper sft --rollouts VERSION`: rejection-sampling SFT on the best correct arm of each question.

    looper sft --rollouts latest --max-steps 20
    looper --config pipelines/rl-cpu.toml loop --mode hybrid      # SFT rounds alternate with ppo

From each question of the rollouts, the correct arm with the highest stored arm reward (the
first on ties) becomes a prompt-completion pair: its exact rendered prompt and its text, so the
policy is trained on what it generated and got right. Questions with no correct arm are left
out (counted). Training continues the adapter that generated the rollouts (as ppo does), or
starts a fresh LoRA when they came from the base model; the loss is on the completion tokens
only (TRL's SFTTrainer, as plain `looper sft`). The dev loss is measured on the dev split of
the prepare artifact the rollouts were made from.
"""

from __future__ import annotations

from looper.config import SftConfig, identity
from looper.data.prompts import render_prompt, sft_completion
from looper.errors import LooperError
from looper.policy import models
from looper.stages import StageResult
from looper.store.artifacts import Artifact, Store, read_rows
from looper.train import runner

STAGE = "sft"


def best_correct_arms(rows: list[dict]) -> list[dict]:
    """{"id", "prompt", "completion", "arm"} per question with a correct arm: the best rewarded one."""
    pairs = []
    for row in rows:
        correct = [
            (r, i) for i, (o, r) in enumerate(zip(row["arm_outputs"], row["arm_rewards"])) if o["correct"]
        ]
        if correct:
            best = row["arm_outputs"][max(correct, key=lambda ri: (ri[0], -ri[1]))[1]]
            pairs.append(
                {"id": row["id"], "prompt": best["prompt"], "completion": best["text"], "arm": best["arm"]}
            )
    return pairs


def run_rejection(config: SftConfig) -> StageResult:
    from datasets import Dataset
    from trl import SFTTrainer

    from looper.train.sft import trl_config

    store = Store(config.workdir, wait=config.wait)
    rollouts = store.resolve("rollouts", config.rollouts)
    base = models.resolve_model(config.model)
    quant = models.resolve_quant(config.quant)
    if rollouts.manifest.get("base_model", {}).get("identity") not in (None, base.identity):
        raise LooperError(
            f"rollouts {rollouts.version} were generated from another base model than --model {config.model}"
        )
    stage_identity = identity(config) | {"model": base.identity, "quant": quant}
    version = store.version_for(STAGE, stage_identity, {"rollouts": rollouts})
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)

    rows = [r for f in sorted(rollouts.path.glob("shard-*.parquet")) for r in read_rows(f)]
    pairs = best_correct_arms(rows)[: config.limit]
    if not pairs:
        raise LooperError(
            f"rollouts {rollouts.version}: no question has a correct arm, nothing to imitate "
            "(roll out more questions or run ppo on them)"
        )
    print(f"sft: {len(pairs)} of {len(rows)} questions have a correct arm; training on the best of each")
    prepare_ref = rollouts.manifest.get("inputs", {}).get("prepare")
    # by version in this home (manifest paths are home-relative), else the recorded path
    prepare = (
        store.find("prepare", prepare_ref["version"]) or Artifact.load(store.workdir / prepare_ref["path"])
        if prepare_ref
        else None
    )
    dev_rows = read_rows(prepare.path / "dev.parquet")[: config.dev_limit] if prepare else []

    tokenizer = models.load_tokenizer(base, trust_remote_code=config.trust_remote_code)
    adapter_path, _ = runner.rollouts_adapter(store, rollouts, base, config)  # found in this home
    model, peft_config = runner.policy_model(config, base, adapter_path, quant)
    job = runner.TrainingRun.begin(store, STAGE, version, config, base=base, quant=quant)  # once loaded
    dev = [
        {
            "prompt": (p := render_prompt(tokenizer, r["prompt"])),
            "completion": sft_completion(r["solution"], p),
        }
        for r in dev_rows
    ]
    trainer = SFTTrainer(
        model=model,
        args=trl_config(config, job.trainer_dir, has_dev=bool(dev)),
        train_dataset=Dataset.from_list(
            [{"prompt": p["prompt"], "completion": p["completion"]} for p in pairs]
        ),
        eval_dataset=Dataset.from_list(dev) if dev else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=job.callbacks(),
    )
    result = job.train(trainer)
    return job.finish(
        trainer,
        tokenizer,
        inputs={"rollouts": rollouts},
        identity=stage_identity,
        counts={
            "train_questions": len(pairs),
            "questions_without_correct_arm": len(rows) - len(pairs),
            "dev_questions": len(dev),
            "steps": trainer.state.global_step,
        },
        metrics={
            "train_loss": result.training_loss,
            "dev_loss": trainer.evaluate()["eval_loss"] if dev else None,
        },
        extra={
            "mode": "rejection-sampling",
            "continued_adapter": store.relative(adapter_path) if adapter_path else None,
        },
    )
