"""Test-only fault injection: die by SIGKILL at a named point, so the fault suite can check that
every stage resumes exactly after a kill anywhere that matters.

    LOOPER_FAULT=save:2 looper sft ...     # killed while writing its 2nd trainer checkpoint

`LOOPER_FAULT=<point>:<n>` kills this process (SIGKILL: no cleanup, no `finally`, no atexit, as
the OOM killer or a dead box) the n-th time it reaches <point>. Unset (always, outside
tests/faults/), each check is one dictionary lookup. The points:

    step    inside a training step: gradients computed, the optimizer step not taken yet
    save    inside a trainer checkpoint save: weights written, optimizer and trainer state not
    shard   inside a table write (a rollouts shard, an eval chunk, a prepare split): the
            temp file written, not yet renamed into place
    commit  inside an artifact commit: manifest.json written, `<v>.partial` not yet renamed
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

POINTS = ("step", "save", "shard", "commit")
_hits: Counter[str] = Counter()


def armed() -> tuple[str, int] | None:
    """(point, n) from LOOPER_FAULT, or None."""
    spec = os.environ.get("LOOPER_FAULT")
    if not spec:
        return None
    name, _, n = spec.partition(":")
    if name not in POINTS or not n.isdigit() or int(n) < 1:
        raise ValueError(
            f"LOOPER_FAULT={spec}: write <point>:<n> with point in {', '.join(POINTS)} and n >= 1"
        )
    return name, int(n)


def point(name: str) -> None:
    """Count a pass through `name`; SIGKILL this process on the armed pass."""
    fault = armed()
    if fault is None or fault[0] != name:
        return
    _hits[name] += 1
    if _hits[name] == fault[1]:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
