"""Per-shard audit work, split across accelerate processes, resumable (:mod:`memreg.sharding`).

The dataset's rows are cut into fixed shards of ``shard_size`` consecutive rows (the cut does not
depend on the number of processes); process ``r`` of ``W`` takes shards ``r, r+W, r+2W, ...``.
Each shard is written atomically to ``parts/shard-NNNNN.jsonl``, so a killed run, started again,
skips the finished ones. The header line holds the seconds spent hashing/scoring, the process and
its memory; then one line per row::

    {"row", "name", "caption", "sha256", "phash", "views", "error", "norm", "align", "score"}

``sha256`` is :func:`memreg.duplicates.content_hash` (the monitor's key), ``phash`` the 64-bit
perceptual hash in hex, ``views`` the codes of the near-duplicate views
(:data:`memreg.audit.near_dup.VIEWS`, :data:`~memreg.audit.near_dup.CODE_BYTES` each: hash, then
colour grid) in hex; an unreadable image has ``error`` set and no hashes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from memreg import sharding
from memreg.audit.near_dup import codes_hex, phash_code
from memreg.audit.source import AuditSource, open_rgb
from memreg.duplicates import content_hash
from memreg.sharding import PARTS_DIR


def shard_path(out: Path, k: int) -> Path:
    return sharding.part_path(out / PARTS_DIR, k)


def read_shard(out: Path, k: int) -> tuple[dict, Iterator[dict]]:
    """(header, iterator over row dicts) of a finished shard; rows are read lazily."""
    return sharding.read_part(out / PARTS_DIR, k)


def read_header(out: Path, k: int) -> dict:
    return sharding.read_header(out / PARTS_DIR, k)


def hash_row(ref) -> tuple[str | None, str | None, str | None, str | None]:
    """(sha256, phash hex, views hex, error) of one image reference; never raises for bad image data."""
    try:
        img = open_rgb(ref)
        return content_hash(img), phash_code(img).tobytes().hex(), codes_hex(img), None
    except Exception as e:  # PIL raises many types for corrupt/truncated/missing files
        return None, None, None, f"{type(e).__name__}: {e}".splitlines()[0][:300]


@dataclass
class ShardResult:
    rows: list[dict]
    hash_s: float
    score_s: float
    captions_scored: int = 0


def audit_shard(source: AuditSource, start: int, stop: int,
                score: Callable[[list[str]], dict] | None) -> ShardResult:
    """Hash every row of ``start..stop-1`` and score its distinct non-empty captions."""
    t0 = time.perf_counter()
    rows = []
    for r in source.rows(start, stop):
        sha, ph, views, err = hash_row(r.image)
        rows.append({"row": r.index, "name": r.name, "caption": r.caption, "sha256": sha, "phash": ph,
                     "views": views, "error": err, "norm": None, "align": None, "score": None})
    t1 = time.perf_counter()
    scored: dict = {}
    if score is not None:
        scored = score(list(dict.fromkeys(x["caption"] for x in rows if x["caption"])))
        for x in rows:
            if x["caption"] in scored:
                x["norm"], x["align"], x["score"] = scored[x["caption"]]
    return ShardResult(rows, t1 - t0, time.perf_counter() - t1, len(scored))


def run_shards(source: AuditSource, out: Path, shard_size: int, rank: int, world: int,
               make_scorer: Callable[[], Callable | None], progress=None) -> dict:
    """Audit this process's unfinished shards; returns {"done": [...], "skipped": [...]}."""
    def make_work():
        scorer = make_scorer()

        def work(start: int, stop: int):
            res = audit_shard(source, start, stop, scorer)
            return {"hash_s": res.hash_s, "score_s": res.score_s, "captions_scored": res.captions_scored}, res.rows
        return work
    return sharding.run_shards(out / PARTS_DIR, len(source), shard_size, rank, world, make_work, progress)
