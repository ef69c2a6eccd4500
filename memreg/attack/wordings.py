"""Perturbed wordings of a caption: what a user who half-remembers a training caption would type.

Four edits, taken in turn so every kind is tried before any repeats: **drop** one word,
**reorder** (swap the two halves around the first " and " / "," / " with ", else two adjacent
words), **synonym** (one word replaced from :data:`SYNONYMS`), **typo** (two adjacent letters of
one word swapped, or one letter dropped). Which word an edit touches comes from a generator
seeded with ``seed``, so the same caption and seed give the same wordings. A perturbation equal to
a training wording or to an earlier perturbation is discarded.
"""

from __future__ import annotations

import re

import numpy as np

# Both directions are used. Colour/shape words include the demo world's synonyms (memreg/demo/data.py).
_PAIRS = (("red", "crimson"), ("purple", "violet"), ("circle", "disc"), ("square", "box"), ("center", "middle"),
          ("photo", "picture"), ("image", "picture"), ("big", "large"), ("small", "little"), ("man", "guy"),
          ("woman", "lady"), ("cup", "mug"), ("car", "automobile"), ("dog", "puppy"), ("cat", "kitten"),
          ("painting", "artwork"), ("beautiful", "pretty"), ("road", "street"), ("sea", "ocean"),
          ("grey", "gray"), ("triangle", "pyramid"), ("cross", "plus"), ("white", "ivory"), ("black", "dark"))
SYNONYMS: dict[str, str] = {a: b for a, b in _PAIRS} | {b: a for a, b in _PAIRS}
KINDS = ("drop", "reorder", "synonym", "typo")
_SPLITS = (" and ", ", ", " with ")


def drop_word(words: list[str], rng: np.random.Generator) -> list[str] | None:
    if len(words) < 2:
        return None
    i = int(rng.integers(len(words)))
    return words[:i] + words[i + 1:]


def reorder(caption: str, words: list[str], rng: np.random.Generator) -> list[str] | None:
    for sep in _SPLITS:
        if sep in caption:
            a, b = caption.split(sep, 1)
            return f"{b}{sep}{a}".split()
    if len(words) < 2:
        return None
    i = int(rng.integers(len(words) - 1))
    return words[:i] + [words[i + 1], words[i]] + words[i + 2:]


def synonym(words: list[str], rng: np.random.Generator) -> list[str] | None:
    idx = [i for i, w in enumerate(words) if w.lower().strip(",.") in SYNONYMS]
    if not idx:
        return None
    i = idx[int(rng.integers(len(idx)))]
    w = words[i].lower().strip(",.")
    return words[:i] + [words[i].lower().replace(w, SYNONYMS[w])] + words[i + 1:]


def typo(words: list[str], rng: np.random.Generator) -> list[str] | None:
    idx = [i for i, w in enumerate(words) if len(re.sub(r"\W", "", w)) >= 3]
    if not idx:
        return None
    i = idx[int(rng.integers(len(idx)))]
    w = words[i]
    j = int(rng.integers(len(w) - 1))
    new = w[:j] + w[j + 1] + w[j] + w[j + 2:] if w[j] != w[j + 1] else w[:j] + w[j + 1:]
    return words[:i] + [new] + words[i + 1:]


def perturb(caption: str, kind: str, rng: np.random.Generator) -> str | None:
    """One edit of ``kind`` (see the module doc); None when the caption has nothing to edit."""
    words = caption.split()
    edit = {"drop": lambda: drop_word(words, rng), "reorder": lambda: reorder(caption, words, rng),
            "synonym": lambda: synonym(words, rng), "typo": lambda: typo(words, rng)}[kind]
    out = edit()
    return " ".join(out) if out else None


def perturbed_wordings(wordings: list[str], n: int, seed: int = 0, tries: int = 8) -> list[tuple[str, str]]:
    """Up to ``n`` distinct ``(kind, wording)`` edits of the training ``wordings`` (the first wording
    first), none equal to a training wording."""
    rng = np.random.default_rng(seed)
    seen = set(wordings)
    out: list[tuple[str, str]] = []
    for attempt in range(n * tries):
        if len(out) >= n or not wordings:
            break
        base = wordings[(attempt // len(KINDS)) % len(wordings)]
        kind = KINDS[attempt % len(KINDS)]
        w = perturb(base, kind, rng)
        if w and w not in seen:
            seen.add(w)
            out.append((kind, w))
    return out
