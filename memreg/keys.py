"""The one stable 63-bit key of a text: the same on every process, run and platform (unlike ``hash``)."""

from __future__ import annotations

import hashlib


def text_key(text: str, seed: int = 0) -> int:
    """63 bits of sha256(``seed`` NUL ``text``): a non-negative int64, so key sets and tensors of keys
    hold 8 bytes per text, and a generator seeded with it differs per (seed, text)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
