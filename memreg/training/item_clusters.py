"""Each training row's item: its image joined with the image's near-duplicates, found once per run.

**Rule** (``eval.item_clusters: near``, the default): two rows are one item when their images decode
to the same pixels (:func:`memreg.duplicates.content_hash`) or are near-duplicates under the rule of
``memreg audit`` (:func:`memreg.audit.near_dup.view_codes`, :data:`~memreg.audit.near_dup.DEFAULT_THRESHOLD`
bits); items are the connected components of both links (:func:`memreg.audit.merge.cluster_rows`, the
clustering the audit writes to ``clusters.jsonl``). ``exact`` links equal pixels only. Why: a
re-encoded, cropped or mirrored copy teaches the model the same picture, so the guard's gate must
flag it with the rest, whatever caption each copy carries.

**Key**: an item is named by the content hash of its first row's image, so a row with no near-duplicate
keeps its exact-pixel key, and ``exact`` and ``near`` flag it alike.

**Once per run, sharded, resumable, cached**: the trainer builds one :class:`DuplicateIndex` before
the first step and hands it to the gate and the monitor. Every process hashes its shards
(:func:`memreg.sharding.run_shards`: shard ``k`` to process ``k mod N``, each part written atomically,
so a run started again after a crash reuses the finished ones); the main process merges once and
writes ``index.npz``; the others read it. All of it lives in ``<cache>/<fingerprint>/``: the
fingerprint covers every row's source (a file's name, size and mtime; the bytes' or pixels' sha256
for an in-memory image), the hash settings (:func:`memreg.audit.near_dup.hash_settings`), the
threshold, the kind and the shard size, so a run on the same data loads the index instead of hashing,
and a changed file or setting can never reuse a stale one. The cache is ``<output_dir>/item_clusters``
unless ``eval.item_clusters_dir`` moves it (e.g. to share it between runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from memreg import sharding
from memreg.audit.merge import RowIndex, cluster_rows
from memreg.audit.near_dup import CODE_BYTES, DEFAULT_THRESHOLD, VIEWS, codes_from_hex, codes_hex, hash_settings
from memreg.duplicates import DuplicateIndex, content_hash
from memreg.errors import MemregError, one_line
from memreg.image_io import load_rgb
from memreg.monitor_config import ITEM_CLUSTER_KINDS

logger = logging.getLogger(__name__)

SHARD_SIZE = 1024                   # rows a shard: a crashed run loses at most this much hashing per process
INDEX_FILE, ERROR_FILE, SETTINGS_FILE = "index.npz", "error.json", "settings.json"
CACHE_DIR = "item_clusters"         # under the run's output_dir unless eval.item_clusters_dir is set


class ItemClusterError(MemregError, ValueError):
    """A training image could not be hashed; the message names its row and the cause."""


def cache_root(eval_cfg, output_dir: str | Path) -> Path:
    """Where the run's item index is cached: ``eval.item_clusters_dir``, or ``<output_dir>/item_clusters``."""
    return Path(eval_cfg.item_clusters_dir) if eval_cfg.item_clusters_dir else Path(output_dir) / CACHE_DIR


def _source_token(image: Any) -> list:
    """What identifies one row's image without decoding it when it is a file or encoded bytes."""
    if isinstance(image, (str, os.PathLike)):
        st = os.stat(image)
        return ["file", os.path.abspath(image), st.st_size, st.st_mtime_ns]
    if isinstance(image, (bytes, bytearray, memoryview)):
        return ["bytes", hashlib.sha256(bytes(image)).hexdigest()]
    name = getattr(image, "filename", "") if isinstance(image, Image.Image) else ""
    if name and os.path.isfile(name):
        return _source_token(name)
    return ["pixels", content_hash(image)]


def fingerprint(images: Sequence[Any], kind: str, threshold: int, shard_size: int) -> str:
    """sha256 hex of the rows' sources in order and every setting the index depends on."""
    h = hashlib.sha256(json.dumps({"kind": kind, "threshold": int(threshold), "shard_size": int(shard_size),
                                   "hash": hash_settings(), "rows": len(images)}, sort_keys=True).encode())
    for image in images:
        h.update(json.dumps(_source_token(image)).encode())
        h.update(b"\n")
    return h.hexdigest()


def hash_image(image: Any, near: bool) -> tuple[str, str | None]:
    """(content sha256 hex, the view codes as hex or None) of one image; raises on unreadable data."""
    img = load_rgb(image)
    return content_hash(img), (codes_hex(img) if near else None)


def _hash_rows(images: Sequence[Any], near: bool) -> Callable[[int, int], tuple[dict, list[dict]]]:
    def work(start: int, stop: int):
        t0 = time.perf_counter()
        rows = []
        for i in range(start, stop):
            try:
                sha, views = hash_image(images[i], near)
                rows.append({"row": i, "sha256": sha, "views": views, "error": None})
            except Exception as e:  # PIL raises many types for corrupt or missing files
                rows.append({"row": i, "sha256": None, "views": None, "error": one_line(e)[:300]})
        return {"hash_s": time.perf_counter() - t0}, rows
    return work


def _merge(parts: Path, n: int, shard_size: int, near: bool, threshold: int,
           names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict] | str:
    """(sha256 bytes (N, 32), item label per row (its first row), stats) from the parts; or the error
    message of the first unreadable row (the parts holding one are removed, so a retry hashes them again)."""
    sha = np.zeros((n, 32), np.uint8)
    codes = np.zeros((n, len(VIEWS), CODE_BYTES) if near else (n, 0), np.uint8)
    error, bad_parts = None, []
    for k in range(len(sharding.shard_ranges(n, shard_size))):
        for x in sharding.read_part(parts, k)[1]:
            i = x["row"]
            if x["error"] is not None:
                error = error or f"training image {names[i]}: {x['error']}"
                bad_parts.append(k)
                continue
            sha[i] = np.frombuffer(bytes.fromhex(x["sha256"]), np.uint8)
            if near:
                codes[i] = codes_from_hex(x["views"])
    if error is not None:
        for k in set(bad_parts):
            sharding.part_path(parts, k).unlink(missing_ok=True)
        return error
    t0 = time.perf_counter()
    _, first, inverse = np.unique(sha, axis=0, return_index=True, return_inverse=True)
    labels, stats = first[inverse.reshape(-1)].astype(np.int64), {}
    if near:
        key64 = sha[:, :8].copy().view(">u8").reshape(-1).astype(np.uint64)
        idx = RowIndex(ok=np.ones(n, bool), sha=key64, codes=codes, cap_exact=np.zeros(n, np.int64),
                       cap_norm=np.zeros(n, np.int64), score=np.full(n, np.nan), unreadable=0)
        labels, pairs, _ = cluster_rows(idx, threshold)
        stats["near_pairs"] = int(pairs)
    return sha, labels, {**stats, "merge_s": time.perf_counter() - t0}


def _write_index(path: Path, sha: np.ndarray, labels: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, sha256=sha, label=labels)
    os.replace(tmp, path)


def build_item_index(images: Sequence[Any], cache: str | Path, kind: str = "near",
                     threshold: int = DEFAULT_THRESHOLD, shard_size: int = SHARD_SIZE, ids: Sequence[Any] | None = None,
                     rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None,
                     progress: bool = True) -> DuplicateIndex:
    """The item index of ``images`` (paths, encoded bytes, PIL images or records with ``"image"``), in order.

    Every one of ``world`` processes calls it with the same ``images`` and its ``rank``; ``barrier``
    (e.g. ``accelerator.wait_for_everyone``) separates the hashing, the main process's merge and the
    reading. ``ids`` name the in-memory rows in errors (default: their positions); ``progress``: show
    the bar and log the summary (the main process). Raises :class:`ItemClusterError` on every process
    when an image cannot be decoded.
    """
    if kind not in ITEM_CLUSTER_KINDS:
        raise ValueError(f"item clusters: kind must be one of {ITEM_CLUSTER_KINDS} (got {kind!r})")
    images = [x["image"] if isinstance(x, dict) else x for x in images]
    ids = list(range(len(images))) if ids is None else list(ids)
    barrier = barrier or (lambda: None)
    n, near = len(images), kind == "near"
    fp = fingerprint(images, kind, threshold, shard_size)
    home = Path(cache) / fp[:24]
    parts, index_path, error_path = home / sharding.PARTS_DIR, home / INDEX_FILE, home / ERROR_FILE
    t0 = time.perf_counter()
    cached = index_path.is_file()
    if not cached:
        parts.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            error_path.unlink(missing_ok=True)
            (home / SETTINGS_FILE).write_text(json.dumps({"kind": kind, "threshold": threshold, "rows": n,
                                                          "shard_size": shard_size, "hash": hash_settings(),
                                                          "fingerprint": fp}, indent=1) + "\n")
        ranges = sharding.shard_ranges(n, shard_size)
        mine = sum(ranges[k][1] - ranges[k][0] for k in sharding.my_shards(len(ranges), rank, world)
                   if not sharding.part_path(parts, k).exists())
        with tqdm(total=mine, desc="item clusters: hashing", unit="img", disable=not progress or mine == 0) as bar:
            sharding.run_shards(parts, n, shard_size, rank, world, lambda: _hash_rows(images, near), progress=bar)
    barrier()
    stats: dict = {}
    if rank == 0 and not index_path.is_file():
        names = [repr(str(x)) if isinstance(x, (str, os.PathLike)) else f"of row {r!r}" for x, r in zip(images, ids)]
        merged = _merge(parts, n, shard_size, near, threshold, names)
        if isinstance(merged, str):
            error_path.write_text(json.dumps({"error": merged}) + "\n")
        else:
            sha, labels, stats = merged
            _write_index(index_path, sha, labels)
    barrier()
    if not index_path.is_file():
        msg = json.loads(error_path.read_text())["error"] if error_path.is_file() else f"{index_path} was not written"
        raise ItemClusterError(f"item clusters: {msg}")
    with np.load(index_path, allow_pickle=False) as z:
        sha, labels = z["sha256"], z["label"]
    if len(labels) != n:
        raise ItemClusterError(f"item clusters: {index_path} holds {len(labels)} rows, the training set {n}")
    hexes = [sha[i].tobytes().hex() for i in range(n)]
    hashes = [hexes[j] for j in labels.tolist()]
    index = DuplicateIndex(hashes, Counter(hashes))
    if progress:
        items, images_ = len(index.counts), len(set(hexes))
        logger.info("item clusters (%s): %d rows, %d distinct images, %d items%s in %.1fs (%s)", kind, n, images_,
                    items, f", {stats['near_pairs']} near-duplicate pairs" if "near_pairs" in stats else "",
                    time.perf_counter() - t0, "cached" if cached else f"cache {home}")
    return index
