"""Trainer checkpoints a resume can trust, and run totals that survive a resume.

A kill or a full disk in the middle of a save leaves a `checkpoint-N` without its trainer
state, optimizer or weights, or with a file cut short. transformers' `get_last_checkpoint`
would pick it anyway and every rerun would fail on it; `last_complete` instead skips (and
removes) it with a message and resumes from the newest complete one. transformers writes
`trainer_state.json` last, after the weights, optimizer, scheduler and RNG state, so a
readable trainer state plus structurally intact weights and optimizer files means the
checkpoint is whole.

transformers' `train_loss` covers only the steps since the resume, and TRL's token count
restarts at 0. `totals_callback` writes `looper_totals.json` (loss summed over steps, tokens)
into every checkpoint, so a resumed run's manifest reports totals over the whole run.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

from looper.store.locking import is_main_rank

WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
TOTALS = "looper_totals.json"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def safetensors_problem(path: Path) -> str | None:
    """None if the header reads and the file holds every tensor it declares (a cut-off file does not)."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError) as exc:
        return f"{path.name} unreadable: {exc}"
    if path.stat().st_size < 8 + length + end:
        return f"{path.name} cut short"
    return None


def torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive; a cut-off one has no central directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{path.name} unreadable: {exc}"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when it is complete)."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_bytes())
        if state.get("global_step") != step_of(checkpoint):
            return f"{TRAINER_STATE} is for step {state.get('global_step')}"
    except FileNotFoundError:
        return f"{TRAINER_STATE} missing"
    except (OSError, ValueError) as exc:
        return f"{TRAINER_STATE} unreadable: {exc}"
    weights = next((checkpoint / name for name in WEIGHTS if (checkpoint / name).is_file()), None)
    if weights is None:
        return "no weights (adapter_model.safetensors)"
    if problem := (
        safetensors_problem(weights) if weights.suffix == ".safetensors" else torch_file_problem(weights)
    ):
        return problem
    if not (checkpoint / OPTIMIZER).is_file():
        return f"{OPTIMIZER} missing"
    return torch_file_problem(checkpoint / OPTIMIZER)


def last_complete(trainer_dir: Path, stage: str) -> str | None:
    """The newest complete `checkpoint-N` under `trainer_dir`; incomplete newer ones are skipped
    (said so) and removed, so the trainer's own rotation never picks or keeps them."""
    if not trainer_dir.is_dir():
        return None
    found = [p for p in trainer_dir.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    for checkpoint in sorted(found, key=step_of, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        print(f"{stage}: skipping incomplete {checkpoint.name} ({problem}); it is removed")
        if is_main_rank():
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def load_totals(checkpoint: str | None) -> dict[str, Any] | None:
    """The run totals saved with `checkpoint` ({'loss_sum', 'tokens'} up to its step), or None."""
    if checkpoint is None:
        return {"step": 0, "loss_sum": 0.0, "tokens": 0}
    try:
        totals = json.loads((Path(checkpoint) / TOTALS).read_bytes())
    except (OSError, ValueError):
        return None
    return totals if totals.get("step") == step_of(Path(checkpoint)) else None


def totals_callback(trainer: Any, before: dict[str, Any]):
    """A TrainerCallback writing the whole run's loss sum and token count into each checkpoint.

    transformers and TRL count loss and tokens only since the resume (`looper.train.trl_internals`)."""
    from transformers import TrainerCallback

    from looper.train.trl_internals import loss_sum_since_resume, total_train_tokens

    class RunTotals(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not state.is_world_process_zero or not folder.is_dir():
                return
            totals = {
                "step": state.global_step,
                "loss_sum": before["loss_sum"] + loss_sum_since_resume(trainer),
                "tokens": before["tokens"] + total_train_tokens(trainer),
            }
            (folder / TOTALS).write_text(json.dumps(totals))

    return RunTotals()
