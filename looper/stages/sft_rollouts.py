"""`looper sft --rollouts VERSION`: rejection-sampling SFT (expert iteration) on the policy's own
correct completions.

    looper sft --rollouts latest --max-steps 20
    looper sft --rollouts latest --per-question 4 --epochs 2      # up to 4 distinct correct per question
    looper --config pipelines/rl-cpu.toml loop --mode expert       # every round: rollouts -> this

From each question of the rollouts, up to `--per-question` distinct correct completions (by text;
the highest stored arm reward first, the first arm on ties) become prompt-completion pairs: the
exact rendered prompt their arm asked with and the text generated, so the policy is trained on
what it generated and got right (STaR / RFT). Questions with no correct arm are left out (counted).
Training continues the adapter that generated the rollouts (as ppo does), or starts a fresh LoRA
when they came from the base model; the dataset is built by sft's own code (one BOS, the loss on
the completion only: `looper.train.sft`); the dev loss is on the gold solutions of the dev split of
the prepare artifact the rollouts were made from. Without --max-steps, --epochs passes over the pairs.
"""

from __future__ import annotations

from looper.config import SftConfig, identity
from looper.errors import LooperError
from looper.policy import models
from looper.stages import StageResult
from looper.store.artifacts import Store, read_rows
from looper.train import runner
from looper.train.sft import build_trainer

STAGE = "sft"


def correct_completions(rows: list[dict], per_question: int = 1) -> list[dict]:
    """{"id", "prompt", "completion", "arm"}: up to `per_question` distinct correct completions of each
    question, the best rewarded first (the first arm on ties)."""
    pairs = []
    for row in rows:
        correct = [
            (reward, -i)
            for i, (o, reward) in enumerate(zip(row["arm_outputs"], row["arm_rewards"]))
            if o["correct"]
        ]
        seen: set[str] = set()
        for _, neg_i in sorted(correct, reverse=True):
            arm = row["arm_outputs"][-neg_i]
            if arm["text"] in seen:
                continue
            seen.add(arm["text"])
            pairs.append(
                {"id": row["id"], "prompt": arm["prompt"], "completion": arm["text"], "arm": arm["arm"]}
            )
            if len(seen) == per_question:
                break
    return pairs


def run_rejection(config: SftConfig) -> StageResult:
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
    pairs = correct_completions(rows, config.per_question)[: config.limit]
    if not pairs:
        raise LooperError(
            f"rollouts {rollouts.version}: no question has a correct arm, nothing to imitate "
            "(roll out more questions or run ppo on them)"
        )
    questions = len({p["id"] for p in pairs})
    print(
        f"sft: {questions} of {len(rows)} questions have a correct arm; training on {len(pairs)} "
        f"distinct correct completion(s) (at most {config.per_question} per question)"
    )
    prepare_ref = rollouts.manifest.get("inputs", {}).get("prepare")
    prepare = store.input("prepare", prepare_ref) if prepare_ref else None
    dev_rows = read_rows(prepare.path / "dev.parquet")[: config.dev_limit] if prepare else []

    job = runner.TrainingRun.begin(store, STAGE, version, config, base=base, quant=quant)
    tokenizer = models.load_tokenizer(base, trust_remote_code=config.trust_remote_code)
    adapter_path, _ = runner.rollouts_adapter(store, rollouts, base, config)  # found in this home
    model, peft_config = runner.policy_model(config, base, adapter_path, quant)
    trainer = build_trainer(
        config, job.trainer_dir, model, tokenizer, [], dev_rows, job.callbacks(),
        train_pairs=pairs, peft_config=peft_config,
    )  # fmt: skip
    result = job.train(trainer)
    return job.finish(
        trainer,
        tokenizer,
        inputs={"rollouts": rollouts},
        identity=stage_identity,
        counts={
            "train_questions": questions,
            "train_completions": len(pairs),
            "questions_without_correct_arm": len(rows) - questions,
            "dev_questions": len(dev_rows),
            "steps": trainer.state.global_step,
            "train_tokens": job.train_tokens(trainer),
        },
        metrics={
            "train_loss": job.train_loss(result, trainer),
            "dev_loss": trainer.evaluate()["eval_loss"] if dev_rows else None,
        },
        extra={
            "mode": "rejection-sampling",
            "continued_adapter": store.relative(adapter_path) if adapter_path else None,
        },
    )
