"""The one base of every error memreg raises for input a user can fix.

Commands (``memreg <command>``, ``train/train.py``) catch :class:`MemregError` and print its message
on one line with exit code 2; anything else is a bug and keeps its traceback. A subclass's message
names the file (and the 1-based row or line, as an editor shows it) and the cause.
"""

from __future__ import annotations

import errno


class MemregError(Exception):
    """A user-fixable problem; the message is complete on one line."""


class DiskFullError(MemregError, OSError):
    """The device ran out of space while memreg was writing; the message names the path."""


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC / EDQUOT however the writing library wrapped it (safetensors raises its own
    error type carrying the OS message)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def one_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors often carry pages)."""
    lines = [s.strip() for s in str(error).splitlines() if s.strip()]
    return lines[0] if lines else type(error).__name__
