"""More than one process: the process group, rank 0's writes, and the batch split.

    torchrun --nproc_per_node 2 -m looper sft ...      # 2 processes, one world (gloo on CPU, NCCL on GPUs)
    accelerate launch --num_processes N -m looper sft ...   # the same, through accelerate (GPUs)

A training stage (sft, ppo, dpo) launched that way runs in every process; `TrainingRun` uses
this module so that:

* all processes form ONE world: the group is set up by accelerate's `PartialState`, the one
  the trainers then reuse, with `cpu=True` where no GPU is visible (without it accelerate
  treats each CPU process as a world of one, and every process would train alone);
* rank 0 alone touches the artifact: it opens the `.partial` directory and commits it; the
  others wait at a barrier before and after and never write (`on_main`);
* the configured batch stays the global batch: `--batch-size` x `--grad-accum` (ppo:
  `--questions-per-step`) is what one optimizer step sees, whatever the number of processes,
  so a run takes the same number of optimizer steps (`split_batch` says how).

Without a launcher (WORLD_SIZE unset or 1) every function is a no-op and the code paths are the
single-process ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from looper.errors import LooperError


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the world the launcher set up (idempotent); nothing for a single process."""
    if launched():
        from accelerate import PartialState

        from looper.policy.models import has_cuda

        PartialState(cpu=not has_cuda())


def _state():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from accelerate import PartialState

    return PartialState()


def world_size() -> int:
    state = _state()
    return state.num_processes if state is not None else 1


def is_main() -> bool:
    state = _state()
    return state is None or state.is_main_process


def barrier() -> None:
    state = _state()
    if state is not None:
        state.wait_for_everyone()


def on_main(fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0 only, between barriers; every rank gets its result (picklable). An error on
    rank 0 reaches every rank as a LooperError, so no process waits for a rank that failed."""
    state = _state()
    if state is None:
        return fn()
    import torch.distributed as dist

    state.wait_for_everyone()
    box: list[Any] = [None]
    if state.is_main_process:
        try:
            box = [("ok", fn())]
        except Exception as exc:  # sent to the other ranks, then raised here as it was
            box = [("error", f"rank 0: {exc}")]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise LooperError(value)
    return value


def split_batch(per_device: int, accumulation: int, world: int | None = None) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) for `world` processes keeping the global batch
    `per_device x accumulation` of one process, so the optimizer steps are the same.

    Gradient accumulation is divided first (per-device memory unchanged); what it cannot take,
    the per-device batch gives: the largest per-device batch, at most the configured one, that
    divides global / world. A global batch that is not a multiple of the world is refused."""
    world = world_size() if world is None else world
    total = per_device * accumulation
    if world <= 1:
        return per_device, accumulation
    if total % world:
        raise LooperError(
            f"the global batch {per_device} x {accumulation} = {total} does not split over {world} processes: "
            f"make --batch-size x --grad-accum (ppo: --questions-per-step) a multiple of {world}"
        )
    share = total // world
    if accumulation % world == 0:
        return per_device, accumulation // world
    size = max(d for d in range(1, min(per_device, share) + 1) if share % d == 0)
    return size, share // size
