"""One run per stage version at a time: an OS file lock beside the `.partial` directory.

`<root>/<stage>/<version>.lock` is locked with `fcntl.flock` by the run that writes
`<version>.partial/` and publishes `<version>/`. The kernel drops the lock when the process
ends, however it ends (kill -9 included), so a dead run's lock is taken over by the next one
without anybody cleaning up. The holder writes its pid and start time into the file only so
that a second run can say who holds it; the lock itself is the flock, never the file's
existence. A run removes its lock file while still holding it, when it ends normally; a
killed run's file stays until the next run takes it over. Removing a lock file others may
wait on is safe because whoever gets the flock checks that the path still names the file it
locked, and starts over on the new file if not (the usual flock + unlink protocol).

A second run of the same version either waits (`--wait`) or stops at once with
`another looper <stage> run holds <path> (pid N, started T)`.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import os
import time
from pathlib import Path

from looper.errors import LooperError

LOCK = ".lock"
GRACE_S = 1.0  # how long a run without --wait retries before it reports the holder


def is_main_rank() -> bool:
    """Under `accelerate launch` every rank runs the stage; rank 0 alone writes and locks."""
    return int(os.environ.get("RANK", "0") or 0) == 0


class RunLock:
    """The flock on one stage version's lock file; `release()` (or process exit) drops it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, path: Path, *, stage: str, target: Path, wait: bool, inputs: list[str] = ()) -> RunLock:
        """`inputs`: the artifacts (`<stage>/<version>`) the run reads, written into the lock file
        so that `looper gc` keeps them while the run holds it (`held_inputs`)."""
        while True:
            fd = open_lock_file(path)
            try:
                if not try_lock(fd, patience=GRACE_S):
                    holder = describe_holder(path)
                    if not wait:
                        raise LooperError(
                            f"another looper {stage} run holds {target} ({holder}): wait for it to end, "
                            "or rerun with --wait to queue behind it"
                        ) from None
                    print(
                        f"{stage}: waiting for the looper {stage} run holding {target} ({holder})", flush=True
                    )
                    fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until that run ends or dies
            except BaseException:
                os.close(fd)
                raise
            if still_named(fd, path):
                break
            os.close(fd)  # the holder removed the file we waited on: lock the current one
        try:
            started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            reads = "".join(f"input {ref}\n" for ref in inputs)
            os.pwrite(fd, f"pid {os.getpid()}\nstarted {started}\n{reads}".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            if still_named(self.fd, self.path):
                self.path.unlink(missing_ok=True)  # while still held: see the module docstring
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1

    def __del__(self) -> None:  # a run abandoned by an exception must not keep its version locked
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the kernel releases it anyway
            pass


class ReadOnlyHome(LooperError):
    """The lock file cannot be created: nothing can be written under this home either."""


def open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise ReadOnlyHome(
                f"cannot write in {path.parent} ({exc.strerror}): looper needs a writable home "
                "(--workdir / LOOPER_HOME) to build anything there"
            ) from None
        raise


def still_named(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a releasing holder may have removed it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def try_lock(fd: int, patience: float) -> bool:
    """Take the exclusive flock without blocking, retrying for `patience` seconds: `looper status`
    and `gc` hold a lock for an instant to look, which must not make a starting run give up."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def describe_holder(path: Path) -> str:
    """'pid N, started T' as the holder wrote it ('pid ?' in the instant before it writes)."""
    try:
        fields = dict(line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)
    except OSError:
        fields = {}
    return f"pid {fields.get('pid', '?')}, started {fields.get('started', '?')}"


def is_locked(path: Path) -> bool:
    """Whether a live run holds this lock file now (for status and gc; takes nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # no lock file (or none readable): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock just taken


def held_inputs(path: Path) -> list[str] | None:
    """The inputs (`<stage>/<version>`) a live run holding this lock file reads; None when nobody
    holds it. Read while the holder keeps the flock, so what it wrote is there (or it has not
    written yet: an instant `looper gc` covers by keeping every version of the stages it is unsure of)."""
    if not is_locked(path):
        return None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [line.split(" ", 1)[1] for line in lines if line.startswith("input ")]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
