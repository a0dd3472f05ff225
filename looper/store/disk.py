"""A full disk says so: `no space left on <path> (needs ~X MB)`, and leaves resumable state.

Writes of artifacts and checkpoints run inside `space_for(path, bytes)`, which turns the
ways a full disk surfaces (OSError ENOSPC from Python, `RuntimeError: [enforce fail at
inline_container.cc]` / `file write failed` from torch.save, `StorageFull` from safetensors)
into that one line. Nothing half-written is published: table and JSON writes remove their
temp file, and a checkpoint cut off mid-save is skipped on resume (`looper.train.checkpoints`).
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from looper.errors import LooperError

MB = 2**20
# what torch's zip writer and safetensors say when a write fails; only a disk that is
# (nearly) full when we look turns these into "no space left"
WRITE_FAILED = ("inline_container", "file write failed", "unexpected pos")
FULL = ("No space left on device", "StorageFull", "os error 28")


class NoSpace(LooperError):
    def __init__(self, path: Path, needed: int):
        self.path, self.needed = Path(path), needed
        super().__init__(
            f"no space left on {path} (needs ~{max(1, round(needed / MB))} MB): free some space "
            "(`looper gc` removes old versions) and rerun the same command; it resumes"
        )


def free_bytes(path: Path) -> int:
    """Free space of the file system holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(exc: BaseException, path: Path, needed: int) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if any(marker in text for marker in FULL):
        return True
    return any(marker in text for marker in WRITE_FAILED) and free_bytes(path) < max(needed, MB)


@contextmanager
def space_for(path: Path, needed: int) -> Iterator[None]:
    """Run a write into `path` (about `needed` bytes); a full disk becomes `NoSpace`."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, LooperError) or not is_disk_full(exc, path, needed):
            raise
        raise NoSpace(path, needed) from exc
    except Exception as exc:  # safetensors' own SafetensorError is neither
        if type(exc).__name__ != "SafetensorError" or not is_disk_full(exc, path, needed):
            raise
        raise NoSpace(path, needed) from exc


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def checkpoint_bytes(model: Any, trainer_dir: Path) -> int:
    """About what one checkpoint takes: an existing one's size, else trainable weights plus
    AdamW's two moments (fp32) and a margin for the trainer's small files."""
    existing = sorted(Path(trainer_dir).glob("checkpoint-*")) if Path(trainer_dir).is_dir() else []
    if existing:
        return max(tree_bytes(p) for p in existing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * 4 * 3 + MB
