"""Find duplicated training images by the content of their decoded pixels.

Two records are duplicates when their images decode to the same RGB pixels, whatever their file
names, formats or how they were handed over (a ``PIL.Image`` or a path): the key is the sha256 of
the ``uint8`` RGB array's shape and bytes. Exact-pixel duplicates are what a scraped fine-tuning set
with re-uploaded files contains and what drives memorization; near-duplicates (re-encoded, resized)
are found by ``memreg audit`` (perceptual hashes, :mod:`memreg.audit.near_dup`), whose clusters
``find_duplicates(..., clusters_from=...)`` can use; copy detection of generations is
:mod:`memreg.copy_detect`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from memreg.image_io import ImageDecodeError, load_rgb
from memreg.keys import text_key

ImageLoadError = ImageDecodeError   # the name this module's callers catch; decoding is memreg.image_io's


def content_hash(image: Any) -> str:
    """sha256 hex digest of the decoded RGB pixels (shape + bytes) of ``image``."""
    arr = np.ascontiguousarray(np.asarray(load_rgb(image), dtype=np.uint8))
    h = hashlib.sha256()
    h.update(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def first_caption(caption: Any) -> str:
    """A record's caption as one string (a list of captions gives its first entry)."""
    if isinstance(caption, (list, tuple)):
        caption = caption[0] if caption else ""
    return "" if caption is None else str(caption).strip()


@dataclass
class DuplicateIndex:
    """Content hashes of a record list and how often each occurs."""

    hashes: list[str]                           # per record, in record order
    counts: Counter = field(default_factory=Counter)   # hash -> number of records with it

    def count(self, i: int) -> int:
        """How many records (this one included) share record ``i``'s pixels."""
        return self.counts[self.hashes[i]]

    def groups(self, min_count: int = 2) -> list[list[int]]:
        """Record indices of each image occurring >= ``min_count`` times, in first-occurrence order."""
        by_hash: dict[str, list[int]] = {}
        for i, h in enumerate(self.hashes):
            by_hash.setdefault(h, []).append(i)
        return [idx for idx in by_hash.values() if len(idx) >= min_count]

    def duplicated(self, min_count: int = 2) -> list[int]:
        """Indices of the records whose image occurs >= ``min_count`` times."""
        return [i for i, h in enumerate(self.hashes) if self.counts[h] >= min_count]

    def unique(self) -> list[int]:
        """Indices of the records whose image occurs exactly once."""
        return [i for i, h in enumerate(self.hashes) if self.counts[h] == 1]

    def item_keys(self) -> list[int]:
        """Per record, the 63-bit key of its item: its image, its near-duplicate cluster (the trainer's
        index, :mod:`memreg.training.item_clusters`) or the audit cluster it belongs to (what the
        guard's gate flags with ``guard.gate_key: image``)."""
        return [text_key(h, seed=1) for h in self.hashes]

    def first_of_each(self) -> list[int]:
        """One record index per distinct image (its first occurrence)."""
        seen: set[str] = set()
        out = []
        for i, h in enumerate(self.hashes):
            if h not in seen:
                seen.add(h)
                out.append(i)
        return out


# Fields of ``memreg audit``'s clusters.jsonl that training reads (one JSON object per cluster).
CLUSTER_ID, CLUSTER_MEMBERS, MEMBER_HASH = "cluster", "members", "sha256"


def read_cluster_keys(path: str | Path) -> dict[str, str]:
    """content hash -> ``"cluster:<id>"`` for every member of an audit's ``clusters.jsonl``."""
    keys: dict[str, str] = {}
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                c = json.loads(line)
                for m in c[CLUSTER_MEMBERS]:
                    if m[MEMBER_HASH]:
                        keys[m[MEMBER_HASH]] = f"cluster:{c[CLUSTER_ID]}"
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: line {n} is not a memreg audit cluster ({type(e).__name__}: {e})") from None
    return keys


def find_duplicates(images: Iterable[Any] | Sequence[dict], clusters_from: str | Path | None = None) -> DuplicateIndex:
    """Hash every image (or every record's ``"image"``) and count the occurrences of each hash.

    ``clusters_from``: an audit's ``clusters.jsonl``; an image in one of its clusters gets the
    cluster's key instead of its own hash, so near-duplicates count as copies of one image.
    """
    clusters = read_cluster_keys(clusters_from) if clusters_from else {}
    hashes = []
    for i, item in enumerate(images):
        image = item["image"] if isinstance(item, dict) else item
        try:
            h = content_hash(image)
        except ImageLoadError as e:
            rid = item.get("id", i) if isinstance(item, dict) else i
            raise ImageLoadError(f"record {rid}: {e}") from None
        hashes.append(clusters.get(h, h))
    return DuplicateIndex(hashes, Counter(hashes))
