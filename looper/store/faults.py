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


# --------------------------------------------------------------------------- kill points

# `LOOPER_KILL_AT=<n>` (tests/faults/test_killpoints.py): SIGKILL this process just before its
# n-th filesystem mutation under LOOPER_HOME, as Python's audit events see them (a file opened
# for writing, a rename/replace, an unlink, a mkdir/rmdir, a symlink). `LOOPER_KILL_LOG=<file>`
# (outside the home) gets one line per mutation: how the suite learns how many points a stage has.
# Writes done inside C/Rust libraries (pyarrow's parquet writer, safetensors) raise no audit event;
# their temp file's creation and rename do.
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MUTATIONS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate"}


def _event_path(event: str, args: tuple) -> str | None:
    """The path under change (the destination of a rename counts too), made absolute."""
    path, dir_fd = (args[1], None) if event in ("os.symlink", "os.link") else (args[0], None)
    if event in ("os.remove", "os.rmdir"):
        dir_fd = args[1]
    elif event == "os.mkdir":
        dir_fd = args[2]
    elif event == "os.rename":
        dir_fd = args[2]
    if isinstance(path, int) or path is None:
        return None  # an open descriptor (ftruncate): its file was counted when it was opened
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        try:
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        except OSError:
            return None
    return os.path.abspath(path)


def install_kill_hook() -> None:
    """With LOOPER_KILL_AT or LOOPER_KILL_LOG set, count (and log) mutations under the home."""
    at, log = os.environ.get("LOOPER_KILL_AT"), os.environ.get("LOOPER_KILL_LOG")
    home = os.environ.get("LOOPER_HOME")
    if not (at or log) or not home:
        return
    home = os.path.realpath(home) + os.sep
    target = int(at) if at else 0
    count = 0
    log_file = open(log, "a", buffering=1) if log else None  # noqa: SIM115 - open for the process' life

    def hook(event: str, args: tuple) -> None:
        nonlocal count
        if event == "open":
            if args[2] is None or not (args[2] & _WRITE_FLAGS) or isinstance(args[0], int):
                return
        elif event not in _MUTATIONS:
            return
        path = _event_path(event, args)
        if path is None:
            return
        # what will fail without changing anything is no mutation (mkdir -p of an existing dir)
        if (event == "os.mkdir" and os.path.isdir(path)) or (
            event in ("os.remove", "os.rmdir") and not os.path.lexists(path)
        ):
            return
        paths = [path]
        if event == "os.rename":
            paths.append(os.path.abspath(os.fsdecode(args[1])) if not isinstance(args[1], int) else "")
        if not any((os.path.realpath(p) + os.sep).startswith(home) for p in paths if p):
            return
        count += 1
        if log_file is not None:
            log_file.write(f"{count} {event} {os.path.relpath(path, home)}\n")
        if count == target:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
