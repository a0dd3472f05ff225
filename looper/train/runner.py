"""Glue shared by the training stages (sft, ppo, dpo): LoRA config, metrics file, resume, and
`TrainingRun`, the one skeleton every training stage begins, resumes and ends with.

Kept out of the stage modules because stages never import each other.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


def lora_config(config: Any):
    """A PEFT LoraConfig from a stage config's lora_* fields."""
    from peft import LoraConfig

    targets = (
        config.target_modules if config.target_modules == "all-linear" else config.target_modules.split(",")
    )
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def optimizer_name(choice: str, cuda: bool, quant: str = "none") -> str:
    """'auto' -> paged 8-bit AdamW on CUDA or with 4-bit weights (the QLoRA recipe, which
    bitsandbytes runs on a CPU too), plain AdamW otherwise (`models.optimizer_for`)."""
    from looper.policy import models

    return models.optimizer_for(choice, cuda, quant)


def report_to(choice: str) -> list[str]:
    # tensorboard is added by TrainingRun.callbacks instead: transformers would write its events
    # under output_dir (the trainer dir), which `finish` deletes
    return [] if choice in ("none", "tensorboard") else [choice]


def tensorboard_callback(log_dir: Path):
    """transformers' TensorBoardCallback writing to `log_dir` (its documented TENSORBOARD_LOGGING_DIR)."""
    from transformers.integrations import TensorBoardCallback

    from looper.errors import LooperError

    previous = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(log_dir)
    try:
        return TensorBoardCallback()  # reads the variable here; the writer opens on rank 0 at train begin
    except RuntimeError:
        raise LooperError(
            "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    finally:
        if previous is None:
            del os.environ["TENSORBOARD_LOGGING_DIR"]
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = previous


def checkpointing_arg() -> str:
    """TrainingArguments' name for activation checkpointing in the installed transformers:
    `activation_checkpointing` from 5.23 on (`gradient_checkpointing` is then a deprecated
    alias), `gradient_checkpointing` before (vLLM 0.33 pins transformers < 5.21)."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def training_dtype(config: Any) -> str:
    """The compute dtype a training stage runs in: --dtype resolved on this machine."""
    from looper.policy import models

    return models.resolve_dtype(getattr(config, "dtype", "auto"))


def training_weights_dtype(config: Any) -> str:
    """The weights a training forward runs, named as rollouts' `generated_by` names the sampling ones
    (for `--behaviour-logprobs auto`): bf16 on CUDA (`models.load_model`); on a CPU float32, which
    under bf16 autocast is 'float32+bf16-autocast', not a bf16 model: its tempered log-probs were
    0.22 nats/token from bf16 weights' on the demo's rollouts (`ppo --behaviour-logprobs recompute`)."""
    from looper.policy import models

    if models.has_cuda():
        return "bfloat16"
    return "float32+bf16-autocast" if training_dtype(config) == "bfloat16" else "float32"


def trainer_args(config: Any, cuda: bool) -> dict[str, Any]:
    """The TrainingArguments every training stage sets the same way from its config."""
    from looper.policy import models

    return {
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps if config.max_steps is not None else -1,
        "optim": optimizer_name(config.optimizer, cuda, models.resolve_quant(config.quant)),
        checkpointing_arg(): config.gradient_checkpointing,
        # bf16 autocast: on CUDA by default; on a CPU with AVX-512 BF16/AMX when asked (--dtype bfloat16)
        "bf16": training_dtype(config) == "bfloat16",
        # accelerate makes CPU processes one gloo world only with use_cpu; on one process it changes nothing
        "use_cpu": not cuda,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 2,  # resume needs the last one; the one before covers a crash while saving
        "logging_steps": config.logging_steps,
        "report_to": report_to(config.report_to),
        "seed": config.seed,
    }


def last_checkpoint(trainer_dir: Path, stage: str = "train") -> str | None:
    """The newest complete `checkpoint-N` an interrupted run left, to resume from (incomplete
    ones, from a kill or a full disk mid-save, are skipped with a message: `looper.train.checkpoints`)."""
    from looper.train.checkpoints import last_complete

    return last_complete(trainer_dir, stage)


def resume_point(trainer_dir: Path, metrics_path: Path, stage: str = "train") -> str | None:
    """The checkpoint to resume from; metrics.jsonl loses the lines logged after it (they are logged again).

    Without a checkpoint the run starts over, and so does its metrics file."""
    from looper.store.artifacts import atomic_write_bytes

    checkpoint = last_checkpoint(trainer_dir, stage)
    if metrics_path.is_file():
        step = int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else -1
        kept = [line for line in metrics_path.read_bytes().splitlines() if logged_step(line) <= step]
        atomic_write_bytes(metrics_path, b"".join(line + b"\n" for line in kept))
    return checkpoint


def logged_step(line: bytes) -> float:
    """A metrics.jsonl line's step; a line cut off by a kill mid-append counts as after any checkpoint."""
    try:
        return orjson.loads(line)["step"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def metrics_callback(path: Path):
    """A TrainerCallback appending each log line (+ tokens/s) to metrics.jsonl."""
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        def __init__(self) -> None:
            self.last = (time.perf_counter(), 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": state.epoch, **logs}
            now, tokens = time.perf_counter(), logs.get("num_tokens")
            if tokens is not None:
                then, tokens_then = self.last
                if tokens > tokens_then and now > then:
                    row["tokens_per_s"] = (tokens - tokens_then) / (now - then)
                self.last = (now, tokens)
            with open(path, "ab") as fh:
                fh.write(orjson.dumps(row) + b"\n")

    return MetricsFile()


def save_adapter(model: Any, tokenizer: Any, path: Path) -> None:
    """The trained adapter only (not TRL's frozen 'ref' copy), as safetensors, plus the tokenizer."""
    adapters = ["default"] if "default" in getattr(model, "peft_config", {}) else None
    model.save_pretrained(path, safe_serialization=True, selected_adapters=adapters)
    tokenizer.save_pretrained(path)
    sort_adapter_config(path / "adapter_config.json")


def sort_adapter_config(path: Path) -> None:
    """PEFT keeps target_modules (and modules_to_save) as sets and writes them in the order of
    this process's string hashing, so identical weights would hash differently from run to run
    and change every downstream version: write those lists sorted."""
    from looper.store.artifacts import atomic_write_bytes

    adapter_config = orjson.loads(path.read_bytes())
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(adapter_config.get(key), list):
            adapter_config[key] = sorted(adapter_config[key])
    atomic_write_bytes(path, orjson.dumps(adapter_config, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def rollouts_input(store: Any, config: Any) -> tuple[Any, Any, str]:
    """(rollouts artifact, base model, resolved quant) for a stage that learns from rollouts.

    Refuses rollouts generated from another base than --model: their stored log-probs and
    adapter belong to that base."""
    from looper.errors import LooperError
    from looper.policy import models

    rollouts = store.resolve("rollouts", config.rollouts)
    base = models.resolve_model(config.model)
    made_on = rollouts.manifest.get("base_model", {}).get("identity")
    if made_on != base.identity:
        raise LooperError(
            f"rollouts {rollouts.version} were generated from base '{made_on}', not --model "
            f"{config.model} ('{base.identity}'): pass the matching --model"
        )
    return rollouts, base, models.resolve_quant(config.quant)


def rollout_rows(rollouts: Any) -> list[dict]:
    """Every question row of a rollouts artifact, in shard order."""
    from looper.errors import LooperError
    from looper.store.artifacts import read_rows

    rows = [r for f in sorted(rollouts.path.glob("shard-*.parquet")) for r in read_rows(f)]
    if not rows:
        raise LooperError(
            f"rollouts {rollouts.version} hold no questions: run `looper rollouts` with more questions"
        )
    return rows


def rollouts_adapter(store: Any, rollouts: Any, base: Any, config: Any) -> tuple[Path | None, str | None]:
    """(the adapter the rollouts were generated with or None for the base, the base mismatch
    --allow-base-mismatch let through or None), found in this home and checked against --model.

    An adapter artifact is found by its version (the rollouts' input of that stage), a path
    inside the home is stored relative to it, so a moved or copied LOOPER_HOME still works."""
    from looper.errors import LooperError
    from looper.policy import models

    recorded = rollouts.manifest.get("policy", {}).get("adapter_path")
    if recorded is None:
        return None, None
    found = [
        store.stage_root(stage) / ref["version"]
        for stage, ref in rollouts.manifest.get("inputs", {}).items()
        if stage != "prepare" and (store.stage_root(stage) / ref["version"]).is_dir()
    ]
    path = found[0] if found else store.workdir / recorded  # an absolute recorded path stays as it is
    if not (path / "adapter_config.json").is_file():
        raise LooperError(
            f"rollouts {rollouts.version} were generated with the adapter {recorded}, which is not "
            f"there any more: rerun `looper rollouts` with an adapter that exists"
        )
    allowed = models.check_adapter_base(path, base, allow_mismatch=config.allow_base_mismatch)
    models.check_adapter_fits(path, base, models.linear_shapes(source=base))
    return path, allowed


def policy_model(config: Any, base: Any, adapter_path: Path | None, quant: str) -> tuple[Any, Any]:
    """(model, peft_config) to train from rollouts: the rollouts' adapter continued (TRL keeps a
    frozen copy as the reference), or the base with a fresh LoRA (reference = base, adapter off).
    The adapter was checked against --model by `rollouts_adapter`."""
    from looper.policy import models

    model = models.load_model(base, quant=quant, trust_remote_code=config.trust_remote_code)
    if adapter_path is None:
        return model, lora_config(config)
    return models.attach_adapter(model, adapter_path, base, trainable=True, allow_base_mismatch=True), None


@dataclass
class TrainingRun:
    """One training stage's run, from `begin` to `finish`:

        job = training.TrainingRun.begin(store, STAGE, version, config, base=..., quant=...)
        trainer = SomeTrainer(..., args=...(output_dir=job.trainer_dir), callbacks=job.callbacks())
        result = job.train(trainer)
        return job.finish(trainer, tokenizer, inputs=..., identity=..., counts=..., metrics=..., extra=...)

    `begin` opens (or, with --resume, reopens) `<version>.partial/` and finds the checkpoint to
    resume from; `finish` has rank 0 alone save the adapter, drop the trainer's resume state and
    commit the artifact (with the config, base model and quant every training stage records).
    Under torchrun / accelerate launch (`looper.train.distributed`) rank 0 alone writes, the other
    ranks wait at barriers around it, and the manifest records `world_size`."""

    stage: str
    version: str
    store: Any
    run: Any  # looper.store.artifacts.Run
    config: Any
    base: Any  # models.ModelSource
    quant: str
    checkpoint: str | None
    before: dict | None = None  # run totals up to `checkpoint` (looper.train.checkpoints.load_totals)

    @classmethod
    def begin(
        cls, store: Any, stage: str, version: str, config: Any, *, base: Any, quant: str
    ) -> TrainingRun:
        from looper.store.artifacts import PARTIAL, Run
        from looper.train import distributed
        from looper.train.trl_internals import compact_fused_head_on_cpu

        compact_fused_head_on_cpu()  # before any trainer is built: TRL's head scores labelled positions only
        distributed.init()
        lock = None
        if distributed.is_main():  # rank 0 alone locks, clears or reopens the .partial directory
            run_ = store.begin(stage, version, resume=config.resume and not config.force)
            resume_point(run_.path / "trainer", run_.path / "metrics.jsonl", stage)
            lock = run_.lock
        distributed.barrier()  # the other ranks read the checkpoint rank 0 kept
        run_ = Run(store, stage, version, store.stage_root(stage) / f"{version}{PARTIAL}", lock)
        checkpoint = last_checkpoint(run_.path / "trainer", stage)
        return cls(stage, version, store, run_, config, base, quant, checkpoint)

    @property
    def trainer_dir(self) -> Path:
        return self.run.path / "trainer"

    @property
    def tensorboard_dir(self) -> Path:
        """`--report-to tensorboard` events: `tensorboard --logdir $LOOPER_HOME/tensorboard`."""
        return self.store.workdir / "tensorboard" / self.stage / self.version

    def callbacks(self) -> list:
        callbacks = [metrics_callback(self.run.path / "metrics.jsonl")]
        if self.config.report_to == "tensorboard":
            print(f"{self.stage}: TensorBoard events -> {self.tensorboard_dir}")
            callbacks.append(tensorboard_callback(self.tensorboard_dir))
        return callbacks

    def train(self, trainer: Any) -> Any:
        """trainer.train(), resumed from the checkpoint `begin` found; a full disk says so (`looper.store.disk`)."""
        from looper.store import disk
        from looper.train import checkpoints

        if self.checkpoint:
            print(f"{self.stage}: resuming from {Path(self.checkpoint).name}")
        self.before = checkpoints.load_totals(self.checkpoint)
        if self.before is None:
            print(
                f"{self.stage}: {self.checkpoint} has no run totals: train_loss will cover the steps from there"
            )
        # first of the on_save callbacks: a checkpoint is complete only with its totals (checkpoints.py)
        trainer.callback_handler.callbacks.insert(
            0, checkpoints.totals_callback(trainer, self.before or {"loss_sum": 0.0, "tokens": 0})
        )
        arm_faults(trainer)  # test-only: LOOPER_FAULT=step:N / save:N (tests/faults/)
        if self.checkpoint and checkpoints.training_done(self.checkpoint):
            return self.restore_finished(trainer)
        with disk.space_for(self.trainer_dir, disk.checkpoint_bytes(trainer.model, self.trainer_dir)):
            return trainer.train(resume_from_checkpoint=self.checkpoint)

    def restore_finished(self, trainer: Any) -> Any:
        """The run was killed after its last step's checkpoint, before publishing: nothing is left
        to train. transformers would still run one more step when resumed there (issue 22: `steps: 5`
        of --max-steps 4, another adapter under the same version), so the checkpoint's weights and
        trainer state are loaded instead, as they stood when the uninterrupted run finished training."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        from looper.train import checkpoints

        print(f"{self.stage}: {Path(self.checkpoint).name} is the last step: training is done, restoring it")
        trainer._load_from_checkpoint(self.checkpoint)
        trainer.state = TrainerState.load_from_json(str(Path(self.checkpoint) / checkpoints.TRAINER_STATE))
        return TrainOutput(trainer.state.global_step, 0.0, {})

    def train_loss(self, result: Any, trainer: Any) -> float:
        """Mean training loss per step over the whole run, a resumed one included."""
        steps_now = trainer.state.global_step - (self.before or {}).get("step", 0)
        if self.before is None or trainer.state.global_step == 0:
            return result.training_loss
        return (self.before["loss_sum"] + result.training_loss * steps_now) / trainer.state.global_step

    def train_tokens(self, trainer: Any) -> int:
        """Tokens trained on over the whole run (TRL's count restarts at a resume)."""
        from looper.train.trl_internals import total_train_tokens

        return total_train_tokens(trainer) + (self.before or {}).get("tokens", 0)

    def finish(
        self,
        trainer: Any,
        tokenizer: Any,
        *,
        inputs: dict,
        identity: dict,
        counts: dict,
        metrics: dict,
        extra: dict | None = None,
    ) -> Any:
        from looper.store.artifacts import Artifact
        from looper.store.result import StageResult
        from looper.train import distributed

        # rank 0 alone writes, once every rank has finished training; the others wait for the commit
        path = distributed.on_main(
            lambda: self._commit(trainer, tokenizer, inputs, identity, counts, metrics, extra)
        )
        return StageResult.from_artifact(Artifact.load(Path(path)))

    def _commit(self, trainer, tokenizer, inputs, identity, counts, metrics, extra) -> str:
        from looper.policy.models import has_cuda
        from looper.store import disk
        from looper.train import distributed

        with disk.space_for(self.run.path, disk.checkpoint_bytes(trainer.model, self.trainer_dir) // 3):
            save_adapter(trainer.model, tokenizer, self.run.path)  # the trained adapter, not TRL's 'ref' copy
        shutil.rmtree(self.trainer_dir, ignore_errors=True)  # resume state is useless once finished
        artifact = self.run.commit(
            config=orjson.loads(orjson.dumps(vars(self.config))),
            inputs=inputs,
            identity=identity,
            counts=counts,
            metrics=metrics,
            extra={
                "base_model": {"spec": self.base.spec, "identity": self.base.identity},
                "quant": self.quant,
                "optimizer": optimizer_name(self.config.optimizer, has_cuda(), self.quant),
                "world_size": distributed.world_size(),
            }
            | (extra or {}),
        )
        return str(artifact.path)


def arm_faults(trainer: Any) -> None:
    """With LOOPER_FAULT set, put the 'step' and 'save' kill points into a transformers Trainer:
    'save' falls after the weights and before the optimizer and trainer state are written."""
    from looper.store import faults

    if faults.armed() is None:
        return
    from transformers import TrainerCallback

    from looper.train.trl_internals import wrap_optimizer_save

    class StepFault(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            faults.point("step")

    trainer.add_callback(StepFault())
    wrap_optimizer_save(trainer, lambda: faults.point("save"))
