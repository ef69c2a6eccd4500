"""Cost of the trainer's item index (memreg/training/item_clusters.py) at two dataset sizes, extrapolated to 1M.

Synthetic training sets of ``--rows`` PNG files (32-64 px smooth colour fields; every 10th image a
planted copy of an earlier one: JPEG, crop, mirror, brightness), written to ``--work``. For each size:

* hashing: seconds per image of the exact-pixel hash alone and of the exact hash plus the seven view
  codes the near rule needs (:func:`memreg.training.item_clusters.hash_image`), over every row;
* the near-pair search (:func:`memreg.audit.near_dup.near_pairs`, faiss ``IndexBinaryFlat``: all pairs);
* the whole build (:func:`build_item_index`, one process) cold, and warm from its cache (fingerprint +
  load).

Then the search on ``--search-rows`` random codes (no hashing: the brute force costs the same for any
codes), the measured scaling exponent of the search, and 1M rows extrapolated from the largest measured
size: hashing linearly, the search quadratically. ``--ivf`` also times faiss ``IndexBinaryIVF`` (not
exhaustive) on the largest hashed size and reports the share of the exact pairs it finds.

    .venv/bin/python scripts/bench_item_clusters.py --rows 1000 10000 --search-rows 40000 --ivf
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from memreg.audit.near_dup import (CODE_BYTES, DEFAULT_THRESHOLD, HASH_BYTES, INDEX_VIEWS, QUERY_VIEWS, VIEWS,
                                   accepted_candidates, codes_from_hex, near_pairs, planted_copy, search_radius)
from memreg.training.item_clusters import build_item_index, hash_image

COPY_KINDS = ("jpeg", "crop_centre", "hflip", "brightness")
MILLION = 1_000_000


def synthetic_rows(root: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` PNG files: smooth random colour fields of 32-64 px, every 10th a planted copy of an earlier one."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    for i in range(n):
        if i % 10 == 9:
            img = planted_copy(images[int(rng.integers(0, i))], COPY_KINDS[(i // 10) % len(COPY_KINDS)], rng)
        else:
            side = int(rng.integers(32, 65))
            grid = (rng.random((int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)) * 255).astype(np.uint8)
            img = Image.fromarray(grid).resize((side, side), Image.BICUBIC)
        images.append(img)
        path = root / f"{i:07d}.png"
        img.save(path)
        paths.append(str(path))
    return paths


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure_size(paths: list[str], work: Path) -> dict:
    _, exact_s = timed(lambda: [hash_image(p, near=False) for p in paths])
    hashed, near_s = timed(lambda: [hash_image(p, near=True) for p in paths])
    codes = np.stack([codes_from_hex(v) for _, v in hashed])
    pairs, search_s = timed(lambda: near_pairs(codes, DEFAULT_THRESHOLD))
    cache = work / f"cache-{len(paths)}"
    shutil.rmtree(cache, ignore_errors=True)
    idx, cold_s = timed(lambda: build_item_index(paths, cache, progress=False))
    _, warm_s = timed(lambda: build_item_index(paths, cache, progress=False))
    index_bytes = sum(f.stat().st_size for f in cache.rglob("index.npz"))
    return {"rows": len(paths), "exact_s_per_img": exact_s / len(paths), "near_s_per_img": near_s / len(paths),
            "search_s": search_s, "pairs": len(pairs), "cold_s": cold_s, "warm_s": warm_s,
            "items": len(idx.counts), "index_bytes": index_bytes, "codes": codes, "pairs_arr": pairs}


def ivf_pairs(codes: np.ndarray, threshold: int, nprobe: int) -> tuple[np.ndarray, float]:
    """The near rule's pairs by faiss IndexBinaryIVF (inverted lists, ``nprobe`` of ~4 sqrt(M) probed)
    over the hashes within the rule's search radius, then the rule's colour test on the candidates."""
    import faiss

    hashes = codes[..., :HASH_BYTES]
    index_codes = np.ascontiguousarray(hashes[:, list(INDEX_VIEWS)].reshape(-1, HASH_BYTES))
    queries = np.ascontiguousarray(hashes[:, list(QUERY_VIEWS)].reshape(-1, HASH_BYTES))
    t = time.perf_counter()
    nlist = max(1, int(4 * math.sqrt(len(index_codes))))
    quant = faiss.IndexBinaryFlat(HASH_BYTES * 8)
    ivf = faiss.IndexBinaryIVF(quant, HASH_BYTES * 8, nlist)
    ivf.train(index_codes)
    ivf.add(index_codes)
    ivf.nprobe = nprobe
    lims, dist, ids = ivf.range_search(queries, search_radius(threshold, True) + 1)
    q = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(lims).astype(np.int64))
    x = ids.astype(np.int64)
    keep = accepted_candidates(codes, QUERY_VIEWS, INDEX_VIEWS, q, x, dist.astype(np.int64), threshold)
    qimg, jimg = q[keep] // len(QUERY_VIEWS), x[keep] // len(INDEX_VIEWS)
    a, b = np.minimum(qimg, jimg), np.maximum(qimg, jimg)
    keep = a != b
    pairs = np.unique(np.stack([a[keep], b[keep]], axis=1), axis=0) if keep.any() else np.zeros((0, 2), np.int64)
    return pairs, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--search-rows", type=int, default=40000, help="random codes for the search alone (0: skip)")
    ap.add_argument("--ivf", action="store_true", help="also time faiss IndexBinaryIVF on the largest hashed size")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None, help="where the synthetic PNGs go (default: a temp dir)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_item_clusters_"))
    rows = sorted(args.rows)
    all_paths = synthetic_rows(work / "data", rows[-1])
    results = [measure_size(all_paths[:n], work) for n in rows]
    base = results[0]
    print(f"item index cost (threshold {DEFAULT_THRESHOLD} of 128 hash bits, one process; "
          f"ratios to {base['rows']} rows)")
    for r in results:
        print(f"  {r['rows']:>7} rows: hash exact {1e3 * r['exact_s_per_img']:.2f} ms/img, exact+views "
              f"{1e3 * r['near_s_per_img']:.2f} ms/img ({r['near_s_per_img'] / r['exact_s_per_img']:.1f}x exact) | "
              f"near-pair search {r['search_s']:.3f}s ({r['search_s'] / base['search_s']:.1f}x), {r['pairs']} pairs | "
              f"build cold {r['cold_s']:.2f}s ({r['cold_s'] / base['cold_s']:.1f}x), cached {r['warm_s']:.3f}s | "
              f"{r['items']} items, index.npz {r['index_bytes'] / 1024:.0f} KiB")
    search = [(r["rows"], r["search_s"]) for r in results]
    if args.search_rows:
        codes = np.random.default_rng(1).integers(0, 256, (args.search_rows, len(VIEWS), CODE_BYTES), dtype=np.uint8)
        _, s = timed(lambda: near_pairs(codes, DEFAULT_THRESHOLD))
        print(f"  {args.search_rows:>7} random codes: near-pair search {s:.2f}s")
        search.append((args.search_rows, s))
    (n0, s0), (n1, s1) = search[-2], search[-1]      # the two largest: fixed costs fade
    exponent = math.log(s1 / s0) / math.log(n1 / n0)
    top = results[-1]
    hash_1m = top["near_s_per_img"] * MILLION
    search_1m = s1 * (MILLION / n1) ** 2
    print(f"search scaling from {n0} to {n1} rows: time ~ N^{exponent:.2f} (near_pairs is faiss's brute force "
          f"over all query x index views' hashes: 2 x 6 = 12 N^2 comparisons of 128 bits, then the colour test)")
    print(f"1M rows, extrapolated: hashing {hash_1m / 3600:.2f} h on one process ({hash_1m / 3600 / 8:.2f} h over "
          f"8), linear from {top['rows']} rows; near-pair search {search_1m / 3600:.1f} h (quadratic from {n1} rows, "
          f"{s1:.2f}s; one process, faiss's threads); view codes {MILLION * len(VIEWS) * CODE_BYTES / 2**20:.0f} MiB, "
          f"index.npz {top['index_bytes'] / top['rows'] * MILLION / 2**20:.0f} MiB")
    if args.ivf:
        exact_pairs = {tuple(p) for p in top["pairs_arr"].tolist()}
        pairs, s = ivf_pairs(top["codes"], DEFAULT_THRESHOLD, args.nprobe)
        found = len(exact_pairs & {tuple(p) for p in pairs.tolist()})
        print(f"  IndexBinaryIVF at {top['rows']} rows, nprobe {args.nprobe}: {s:.3f}s ({s / top['search_s']:.2f}x the "
              f"brute force), found {found} of {len(exact_pairs)} exact pairs "
              f"({found / max(1, len(exact_pairs)):.3f})")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
