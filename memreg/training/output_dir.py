"""Claiming a training output dir: one writer at a time, and a new run never inherits an old one.

* :class:`OutputDirLock`: ``<output_dir>/.memreg.lock`` created with ``O_EXCL`` and holding the PID,
  host and start time of the main process. A lock whose PID is gone (same host) is taken over with a
  warning; a live one, or one from another host (its PID cannot be checked from here), is an
  :class:`OutputDirLockedError` naming the holder. Released when training ends or raises.
* :func:`move_aside`: ``--overwrite_output_dir`` renames the previous run to
  ``<output_dir>.prev-<UTC timestamp>`` (logged) so its checkpoints can neither be resumed nor pruned
  by the new run, and nothing it produced is deleted.
* :func:`claim_output_dir`: both, on the main process, before any process writes there.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from memreg.training.checkpoint import LOCK_NAME, CheckpointError

logger = logging.getLogger(__name__)


class OutputDirLockedError(CheckpointError):
    """Another live process is writing the same output dir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass
class OutputDirLock:
    path: Path

    @classmethod
    def acquire(cls, output_dir: str | Path) -> OutputDirLock:
        """Create the lock file (taking over a stale one); raise if a live process holds it."""
        path = Path(output_dir) / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(2):
            try:
                fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                cls._take_over_if_stale(path)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            return cls(path)
        raise OutputDirLockedError(f"could not create the lock {str(path)!r} (another process keeps creating it)")

    @staticmethod
    def _take_over_if_stale(path: Path) -> None:
        try:
            held = json.loads(path.read_text())
            pid, host = int(held["pid"]), str(held["host"])
        except (OSError, ValueError, KeyError, TypeError):
            held, pid, host = {}, None, None
        if pid is not None and host == socket.gethostname() and not _pid_alive(pid):
            logger.warning("output dir lock %s was held by PID %d on %s (started %s), which is no longer "
                           "running; taking it over", path, pid, host, held.get("started", "?"))
        elif pid is None:
            logger.warning("output dir lock %s is unreadable; taking it over", path)
        else:
            where = "this machine" if host == socket.gethostname() else f"host {host!r}"
            raise OutputDirLockedError(
                f"output_dir {str(path.parent)!r} is in use by PID {pid} on {where} (lock {str(path)!r}, started "
                f"{held.get('started', '?')}); stop that run or pick another --output_dir (delete the lock only "
                "if that process is gone)")
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        try:
            if int(json.loads(self.path.read_text())["pid"]) == os.getpid():
                self.path.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            pass


def move_aside(output_dir: str | Path) -> Path | None:
    """Rename a non-empty ``output_dir`` to ``<output_dir>.prev-<UTC timestamp>``; returns the new path."""
    p = Path(output_dir)
    if not p.is_dir() or not any(c.name != LOCK_NAME for c in p.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = p.with_name(f"{p.name}.prev-{stamp}")
    n = 1
    while dest.exists():
        dest = p.with_name(f"{p.name}.prev-{stamp}-{n}")
        n += 1
    try:
        os.rename(p, dest)
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM):
            raise CheckpointError(f"--overwrite_output_dir: cannot move {str(p)!r} aside to {str(dest)!r} ({e.strerror})"
                                  ) from None
        raise
    logger.warning("overwrite_output_dir: moved the previous run in %s to %s (nothing was deleted)", p, dest)
    return dest


def claim_output_dir(output_dir: str | Path, accelerator, overwrite: bool) -> OutputDirLock | None:
    """Main process: refuse a live lock, move the previous run aside when ``overwrite``, create the dir
    and take the lock; other processes wait for it. Returns the lock (None on other processes)."""
    lock = None
    if accelerator.is_main_process:
        p = Path(output_dir)
        if overwrite and p.is_dir():
            OutputDirLock.acquire(p).release()  # a live lock in the old dir is an error, not moved aside
            move_aside(p)
        lock = OutputDirLock.acquire(p)
    accelerator.wait_for_everyone()
    return lock
