"""Merge the shard files into the report: clusters, caption repeats, risk ranking.

Memory: the merge keeps a fixed-size index per row (content-hash key, the 64-byte codes of the
seven near-duplicate views -- hash and colour grid --, two caption keys, the score: ~480 bytes)
-- "the hash index" -- and reads texts again, streamed, only for the clusters and caption groups
it writes out.

* **Clusters**: rows whose decoded pixels are equal (sha256) are one image; images whose view
  codes are near-duplicates (a view of one within ``threshold`` hash bits of a view of the other
  and their colours agreeing: the rule and the faiss search of
  :func:`memreg.audit.near_dup.near_pairs`) are linked, and the connected
  components (``scipy.sparse.csgraph``) are the clusters.
* **Risk** of a cluster ``= log2(1 + size) * (1 + q)``, ``q`` the fraction of scored rows whose
  caption scores below the cluster's highest caption score: copies count first (memorization grows
  with duplication), and the base model's reaction to the caption scales it by up to 2x.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memreg.audit.captions import normalize_caption
from memreg.audit.near_dup import CODE_BYTES, VIEWS, codes_from_hex, near_pairs
from memreg.audit.shards import read_shard
from memreg.keys import text_key
from memreg.sharding import shard_ranges

MAX_LISTED = 100  # unreadable images listed in audit.json (all go to unreadable.jsonl)


@dataclass
class RowIndex:
    """Per-row arrays over the whole dataset, in row order."""

    ok: np.ndarray          # bool: image readable
    sha: np.ndarray         # uint64: first 8 bytes of the content sha256
    codes: np.ndarray       # uint8 (N, V, CODE_BYTES): codes of the views (near_dup.VIEWS); (N, B): one hash a row
    cap_exact: np.ndarray   # int64 key of the caption text (0: empty caption)
    cap_norm: np.ndarray    # int64 key of the normalised caption
    score: np.ndarray       # float64, NaN where not scored
    unreadable: int


def read_index(out: Path, num_rows: int, shard_size: int, unreadable_path: Path) -> RowIndex:
    """Pass 1 over the shards: the per-row arrays; unreadable rows are streamed to ``unreadable_path``."""
    n = num_rows
    idx = RowIndex(np.zeros(n, bool), np.zeros(n, np.uint64), np.zeros((n, len(VIEWS), CODE_BYTES), np.uint8),
                   np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, np.nan), 0)
    with unreadable_path.open("w", encoding="utf-8") as bad:
        for k in range(len(shard_ranges(num_rows, shard_size))):
            for x in read_shard(out, k)[1]:
                i = x["row"]
                if x["error"] is None:
                    idx.ok[i] = True
                    idx.sha[i] = int(x["sha256"][:16], 16)
                    idx.codes[i] = codes_from_hex(x["views"])
                else:
                    idx.unreadable += 1
                    bad.write(f'{{"row": {i}, "name": {_json(x["name"])}, "error": {_json(x["error"])}}}\n')
                if x["caption"]:
                    idx.cap_exact[i] = text_key(x["caption"])
                    idx.cap_norm[i] = text_key(normalize_caption(x["caption"]))
                if x["score"] is not None:
                    idx.score[i] = x["score"]
    return idx


def _json(v) -> str:
    return json.dumps(v, ensure_ascii=False)


def cluster_rows(idx: RowIndex, threshold: int) -> tuple[np.ndarray, int, int]:
    """(cluster label per row, -1 for unreadable; number of near-duplicate pairs linked; distinct images)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    labels = np.full(len(idx.ok), -1, dtype=np.int64)
    rows = np.flatnonzero(idx.ok)
    if rows.size == 0:
        return labels, 0, 0
    _, first, inverse = np.unique(idx.sha[rows], return_index=True, return_inverse=True)
    reps = rows[first]                       # one row per distinct image
    pairs = near_pairs(idx.codes[reps], threshold)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(reps), len(reps)))
    _, comp = connected_components(graph, directed=False)
    # label clusters by their first row, so labels do not depend on hash order
    comp_first = np.full(comp.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(comp_first, comp, reps)
    labels[rows] = comp_first[comp[inverse.reshape(-1)]]
    return labels, len(pairs), len(reps)


def score_quantile(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Fraction of the finite ``scores`` strictly below each of ``values`` (NaN values give 0)."""
    s = np.sort(scores[np.isfinite(scores)])
    if s.size == 0:
        return np.zeros(len(values))
    q = np.searchsorted(s, np.nan_to_num(values, nan=-np.inf), side="left") / s.size
    return q.astype(np.float64)


def risk(size: np.ndarray, quantile: np.ndarray) -> np.ndarray:
    """``log2(1 + size) * (1 + quantile)`` (see module doc)."""
    return np.log2(1.0 + size) * (1.0 + quantile)


@dataclass
class ClusterTable:
    """Clusters with at least ``min_size`` rows, sorted by risk (highest first)."""

    label: np.ndarray       # cluster label (its first row)
    size: np.ndarray
    images: np.ndarray      # distinct images (content hashes) in the cluster
    max_score: np.ndarray
    quantile: np.ndarray
    risk: np.ndarray


def rank_clusters(idx: RowIndex, labels: np.ndarray, min_size: int) -> ClusterTable:
    ok = labels >= 0
    lab, inv, size = np.unique(labels[ok], return_inverse=True, return_counts=True)
    max_score = np.full(len(lab), -np.inf)
    np.fmax.at(max_score, inv, np.nan_to_num(idx.score[ok], nan=-np.inf))
    max_score[np.isinf(max_score)] = np.nan
    pair = np.unique(np.stack([inv, idx.sha[ok].astype(np.int64)]), axis=1)
    images = np.bincount(pair[0], minlength=len(lab))
    q = score_quantile(idx.score, max_score)
    r = risk(size, q)
    keep = size >= min_size
    order = np.lexsort((lab[keep], -r[keep]))
    sel = np.flatnonzero(keep)[order]
    return ClusterTable(lab[sel], size[sel], images[sel], max_score[sel], q[sel], r[sel])


def caption_groups(idx: RowIndex) -> dict:
    """Counts of caption repeats: exact and normalised keys occurring more than once."""
    def repeats(keys):
        k = keys[keys != 0]
        _, c = np.unique(k, return_counts=True)
        return {"distinct": int(c.size), "repeated": int((c > 1).sum()), "rows_in_repeats": int(c[c > 1].sum())}
    return {"exact": repeats(idx.cap_exact), "normalized": repeats(idx.cap_norm),
            "empty": int((idx.cap_exact == 0).sum())}


def finite_or_none(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)
