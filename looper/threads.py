"""The OpenMP/torch thread policy of a `looper` process, chosen once, before torch is imported.

`looper.cli.main` calls `apply_thread_policy()` first thing; the OpenMP runtime torch ships
(libgomp) reads these variables once, when torch loads, so setting them later does nothing.

- `OMP_WAIT_POLICY=PASSIVE`: a thread that reaches a barrier sleeps instead of spinning. With
  the default (spin ~300k times first), torch on 2 threads is 10-18x slower whenever another
  process holds one of the cores (a second stage, eval beside training, a browser): the spinning
  thread waits for one the kernel has descheduled (BENCHMARKS.md, "Where the time goes").
- `OMP_NUM_THREADS` = the cores this process may run on (its CPU affinity, which containers and
  `taskset` narrow; torch's own default counts every core of the machine).

Each is set only where the user's environment has not set it: their value wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping


def allowed_cores() -> int:
    """Cores this process may run on: its affinity mask where the OS has one, else all."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def thread_policy(cores: int) -> dict[str, str]:
    """The variables Looper wants for a process allowed `cores` cores."""
    return {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(cores)}


def apply_thread_policy(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the policy's variables that `environ` (default: this process's) lacks; returns those set.

    Must run before torch is imported to take effect; an empty value counts as unset."""
    environ = os.environ if environ is None else environ
    chosen = {k: v for k, v in thread_policy(allowed_cores()).items() if not environ.get(k)}
    environ.update(chosen)
    return chosen
