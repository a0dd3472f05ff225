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


def gold_pairs(rows: list[dict], tokenizer) -> list[dict]:
    """Prepared rows -> {"prompt", "completion"}: the chat-rendered question and its gold solution."""
    pairs = []
    for row in rows:
        prompt = render_prompt(tokenizer, row["prompt"])
        pairs.append({"prompt": prompt, "completion": sft_completion(row["solution"], prompt)})
    return pairs


def pair_dataset(pairs: list[dict], tokenizer):
    """Prompt-completion string pairs (prompts rendered as generation saw them) in TRL's standard
    format; each prompt as `trl_prompt` hands it, so TRL's tokens are generation's (one BOS)."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": trl_prompt(tokenizer, p["prompt"]), "completion": p["completion"]} for p in pairs]
    )


def build_dataset(rows: list[dict], tokenizer):
    """The gold-solution dataset of prepared rows (plain `looper sft`, and every dev loss)."""
    return pair_dataset(gold_pairs(rows, tokenizer), tokenizer)


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
    *,
    train_pairs: list[dict] | None = None,
    peft_config=None,
):
    """TRL's SFTTrainer on the gold solutions of `train_rows` (or on `train_pairs`: rendered prompts
    and completions, e.g. a policy's own correct ones), the dev loss on `dev_rows`' gold solutions.
    A fresh LoRA on the frozen base unless `model` already carries the adapter to continue."""
    from trl import SFTTrainer

    train = (
        pair_dataset(train_pairs, tokenizer)
        if train_pairs is not None
        else build_dataset(train_rows, tokenizer)
    )
    return SFTTrainer(
        model=model,
        args=trl_config(config, output_dir, has_dev=bool(dev_rows)),
        train_dataset=train,
        eval_dataset=build_dataset(dev_rows, tokenizer) if dev_rows else None,
        processing_class=tokenizer,
        peft_config=runner.lora_config(config) if train_pairs is None else peft_config,
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
