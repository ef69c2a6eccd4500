"""Caption repeats: exact text and a normalised form (case, Unicode form, punctuation, spacing)."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize_caption(text: str) -> str:
    """NFKC, lower case, punctuation/underscores to spaces, runs of spaces collapsed."""
    return " ".join(_NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split())


def text_key(text: str) -> int:
    """A 63-bit key of ``text`` (blake2b), so repeat counting holds 8 bytes per row, not the text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1
