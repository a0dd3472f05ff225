"""`looper dpo`: Direct Preference Optimisation on preference pairs mined from the rollouts, via TRL.

    looper dpo                                  # one pair per question: best correct arm vs worst wrong arm
    looper dpo --pairs-per-question 2           # the 2 best correct arms against the 2 worst wrong arms
    accelerate launch -m looper dpo ...         # data parallel over the GPUs of one box

Pairs (`preference_pairs`): within each question, its correct arms ranked by `arm_rewards`
(highest first) are paired in order with its incorrect arms ranked lowest first, up to
`--pairs-per-question` pairs and as many as the smaller side holds. A question whose arms
are all correct or all wrong gives no pair. TRL's `DPOTrainer` then raises each chosen
completion's log-likelihood ratio to the reference above the rejected one's (sigmoid loss).

One prompt per pair: the chosen arm's. Arms of one question may use different styles, so
different prompts; a pair is scored under the prompt the chosen (the behaviour we reinforce)
was generated from, and the rejected completion is pushed down in that same context. We do
not restrict pairs to one style: that would drop every question whose correct and wrong arms
come from different styles, and the spec ranks arms by reward, not by style. The cost: a
cross-style pair also carries a style difference, not only right-vs-wrong; their number is printed.

Reference and adapter, as in `looper ppo`: from rollouts of an sft adapter, training continues
that adapter and the reference is the sft policy itself (TRL's DPOTrainer, given a PeftModel
and no peft_config, copies the adapter into a frozen "ref" adapter and scores the reference
with it); from the base model, a fresh LoRA is trained and the reference is the base (adapter off).

Simplifications: prompt and completion strings are re-tokenized by TRL (the stored token ids
are not reused), and TRL appends EOS to every completion, truncated ones included.
"""

from __future__ import annotations

from looper.config import DpoConfig, identity
from looper.errors import LooperError
from looper.policy import models
from looper.stages import StageResult
from looper.store.artifacts import Store
from looper.train import distributed, runner

STAGE = "dpo"
MAX_LENGTH_CAP = 4096  # tokens of prompt + completion; rollouts are bounded by their max_new_tokens anyway


def preference_pairs(rows: list[dict], k: int = 1) -> list[dict]:
    """Per question: its k best correct arms (by arm reward) against its k worst incorrect arms, in order."""
    pairs = []
    for row in rows:
        arms = list(zip(row["arm_outputs"], row["arm_rewards"]))
        best = sorted(
            (a for a in arms if a[0]["correct"]), key=lambda a: -a[1]
        )  # stable: ties keep arm order
        worst = sorted((a for a in arms if not a[0]["correct"]), key=lambda a: a[1])
        for (good, good_reward), (bad, bad_reward) in zip(best[:k], worst[:k]):
            pairs.append(
                {
                    "id": row["id"],
                    "prompt": good["prompt"],
                    "chosen": good["text"],
                    "rejected": bad["text"],
                    "chosen_arm": good["arm"],
                    "rejected_arm": bad["arm"],
                    "cross_prompt": good["prompt"] != bad["prompt"],
                    "chosen_reward": good_reward,
                    "rejected_reward": bad_reward,
                }
            )
    return pairs


def pair_dataset(pairs: list[dict], tokenizer):
    """TRL's prompt/chosen/rejected strings; the prompt as `trl_prompt` hands it, so the prompt
    tokens TRL scores are the ones the arms were generated from (one BOS)."""
    from datasets import Dataset

    from looper.data.prompts import trl_prompt

    return Dataset.from_list(
        [
            {"prompt": trl_prompt(tokenizer, p["prompt"]), "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in pairs
        ]
    )


def max_length(pairs: list[dict], tokenizer) -> int:
    """The longest prompt + completion in tokens (+ BOS/EOS slack), capped at MAX_LENGTH_CAP."""

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    longest = max(n(p["prompt"]) + max(n(p["chosen"]), n(p["rejected"])) for p in pairs)
    return min(longest + 4, MAX_LENGTH_CAP)


def dpo_config(config: DpoConfig, output_dir, length: int):
    from trl import DPOConfig

    cuda = models.has_cuda()
    # --batch-size x --grad-accum is the global batch, split over the processes of a torchrun launch
    per_device, accumulation = distributed.split_batch(config.batch_size, config.grad_accum)
    return DPOConfig(
        **runner.trainer_args(config, cuda),
        output_dir=str(output_dir),
        beta=config.beta,
        loss_type=["sigmoid"],  # the original DPO loss
        max_length=length,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=config.learning_rate,
        max_grad_norm=config.max_grad_norm,
        data_seed=config.seed,
        dataset_num_proc=None,
    )


def last_logged(log_history: list[dict], key: str):
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


def run(config: DpoConfig) -> StageResult:
    if config.pairs_per_question < 1:
        raise LooperError(f"--pairs-per-question {config.pairs_per_question}: must be 1 or more")
    store = Store(config.workdir, wait=config.wait)
    rollouts, base, quant = runner.rollouts_input(store, config)
    stage_identity = identity(config) | {"model": base.identity, "quant": quant}
    version = store.version_for(STAGE, stage_identity, {"rollouts": rollouts})
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)

    rows = runner.rollout_rows(rollouts)
    pairs = preference_pairs(rows, config.pairs_per_question)
    without = len(rows) - len({p["id"] for p in pairs})
    if not pairs:
        raise LooperError(
            f"rollouts {rollouts.version} give no preference pairs: every question's arms are all "
            "correct or all wrong; roll out more questions or more arms"
        )
    cross = sum(p["cross_prompt"] for p in pairs)
    print(
        f"dpo: {len(pairs)} preference pair(s) from {len(rows)} questions; {without} question(s) give none "
        f"(arms all correct or all wrong); {cross} pair(s) rank arms of different prompts (scored under the chosen's)"
    )

    from trl import DPOTrainer

    # the rollouts' adapter, found in this home and checked against --model before anything is written
    adapter_path, base_mismatch = runner.rollouts_adapter(store, rollouts, base, config)
    tokenizer = models.load_tokenizer(base, trust_remote_code=config.trust_remote_code)
    model, peft_config = runner.policy_model(config, base, adapter_path, quant)
    job = runner.TrainingRun.begin(store, STAGE, version, config, base=base, quant=quant)  # once loaded
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(config, job.trainer_dir, max_length(pairs, tokenizer)),
        train_dataset=pair_dataset(pairs, tokenizer),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=job.callbacks(),
    )
    result = job.train(trainer)
    history = trainer.state.log_history
    return job.finish(
        trainer,
        tokenizer,
        inputs={"rollouts": rollouts},
        identity=stage_identity,
        counts={
            "questions": len(rows),
            "pairs": len(pairs),
            "questions_without_pairs": without,
            "steps": trainer.state.global_step,
        },
        metrics={
            "train_loss": job.train_loss(result, trainer),
            "final_reward_accuracy": last_logged(history, "rewards/accuracies"),
            "final_reward_margin": last_logged(history, "rewards/margins"),
        },
        extra={
            "reference": store.relative(adapter_path) if adapter_path else "base",
            "base_mismatch_allowed": base_mismatch,
            "beta": config.beta,
            "pairs_per_question": config.pairs_per_question,
        },
    )
