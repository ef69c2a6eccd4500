"""Caption repeats: exact text and a normalised form (case, Unicode form, punctuation, spacing)."""

from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize_caption(text: str) -> str:
    """NFKC, lower case, punctuation/underscores to spaces, runs of spaces collapsed."""
    return " ".join(_NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split())
