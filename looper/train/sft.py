"""SFT training glue shared by `looper sft` and `looper sft --rollouts`: the prompt/completion
dataset, TRL's SFTConfig from an SftConfig, and the trainer.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from looper.config import SftConfig
from looper.data.prompts import render_prompt, sft_completion, trl_prompt
from looper.policy import models
from looper.train import distributed, runner


def build_dataset(rows: list[dict], tokenizer):
    """Prompt-completion string pairs in TRL's standard (non-conversational) format; the prompt as
    `trl_prompt` hands it, so TRL's tokens are generation's (one BOS)."""
    from datasets import Dataset

    records = []
    for row in rows:
        prompt = render_prompt(tokenizer, row["prompt"])
        records.append(
            {"prompt": trl_prompt(tokenizer, prompt), "completion": sft_completion(row["solution"], prompt)}
        )
    return Dataset.from_list(records)


def trl_config(config: SftConfig, output_dir: Path, *, has_dev: bool):
    from trl import SFTConfig

    cuda = models.has_cuda()
    # --batch-size x --grad-accum is the global batch, split over the processes of a torchrun launch
    per_device, accumulation = distributed.split_batch(config.batch_size, config.grad_accum)
    return SFTConfig(
        **runner.trainer_args(config, cuda),
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=max(config.batch_size, 4),
        gradient_accumulation_steps=accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        # TRL refuses padding_free with a max_length unless it packs: padding-free rows are not truncated
        max_length=None if config.padding_free else config.max_length,
        completion_only_loss=True,
        padding_free=config.padding_free,
        eval_strategy="steps" if has_dev else "no",
        eval_steps=config.eval_steps,
        data_seed=config.seed,
        dataset_num_proc=None,
    )


def build_trainer(
    config: SftConfig,
    output_dir: Path,
    model,
    tokenizer,
    train_rows: list[dict],
    dev_rows: list[dict],
    callbacks: list | None = None,
):
    """TRL's SFTTrainer with a fresh LoRA adapter on the frozen base."""
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=trl_config(config, output_dir, has_dev=bool(dev_rows)),
        train_dataset=build_dataset(train_rows, tokenizer),
        eval_dataset=build_dataset(dev_rows, tokenizer) if dev_rows else None,
        processing_class=tokenizer,
        peft_config=runner.lora_config(config),
        callbacks=callbacks or [],
    )


def first_dev_loss(metrics_path: Path) -> float | None:
    """The dev loss measured before training, from an interrupted run's metrics.jsonl."""
    if metrics_path.is_file():
        for line in metrics_path.read_bytes().splitlines():
            row = orjson.loads(line)
            if row.get("step") == 0 and "eval_loss" in row:
                return row["eval_loss"]
    return None
