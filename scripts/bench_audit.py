"""Benchmark ``memreg audit`` in one run and print ratios.

    python scripts/bench_audit.py [--work DIR] [--scale-rows 512] [--mem-rows 10000 100000] [--pairs-rows 20000]
    python scripts/bench_audit.py --recall [--recall-side 128] [--recall-seeds 3] --scale-rows 0 --mem-rows --pairs-rows 20000

1. captions/s and images/s for 1 vs 2 processes (``accelerate launch``, CPU/gloo where there is
   no GPU) on ``--scale-rows`` synthetic rows with the tiny SD pipeline of ``memreg.testing``;
2. memory of a one-process ``--no-score`` audit at each of ``--mem-rows``: peak RSS after the
   shard phase and overall, and the anonymous RSS (``RssAnon``: heap, no file-backed pages) at
   the end of the fullest shard and after the merge. Peak RSS also counts the pages of the
   memory-mapped Arrow table the audit has read (the kernel can drop them; they grow with N), so
   the anonymous figure is the one that shows whether per-row data is held (should stay flat;
   the merge adds the hash index);
3. near-duplicate search at ``--pairs-rows`` images: one pHash a row (the audit before views)
   by faiss's multi-index hash, by vectorised numpy over all pairs and by faiss's compiled brute
   force (``IndexBinaryFlat``, what ``near_pairs`` uses), which give the same pairs; then the view
   codes of ``memreg.audit.near_dup`` (hash + colour grid; query views of every row against index
   views of every row) by ``near_pairs`` against numpy (same pairs), and the hashing rate of one
   pHash vs the views;
4. ``--recall``: recall per planted transformation (each copy matched to its original by the
   rule), wrong pairs and originals merged into one cluster, before (one pHash a row) and after
   (the views with their colour grids), on copies of scikit-image photos; the web world's 16-px
   crops of each demo photo joined to it; and the false pairs among the demo world's procedural
   scenes (all distinct images), before and after.

Synthetic rows: 32x32 PNGs of random 8x8 colour blocks (coarser blocks give pHashes so alike that
near-duplicate links chain most rows into one cluster) in a parquet shard, 10% of them exact
copies and 5% JPEG re-encodes of earlier rows, captions drawn from 200 templates.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def synthetic_parquet(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows (image bytes, caption) as one parquet file."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images: list[bytes] = []
    for i in range(n):
        r = rng.random()
        if i > 10 and r < 0.10:
            images.append(images[int(rng.integers(i))])
            continue
        if i > 10 and r < 0.15:
            src = Image.open(io.BytesIO(images[int(rng.integers(i))])).convert("RGB")
            fmt = "JPEG"
        else:
            blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            src = Image.fromarray(np.kron(blocks, np.ones((4, 4, 1), np.uint8)))
            fmt = "PNG"
        buf = io.BytesIO()
        src.save(buf, format=fmt, **({"quality": 60} if fmt == "JPEG" else {}))
        images.append(buf.getvalue())
    caps = [f"a picture of thing {int(k)}" for k in rng.integers(0, 200, size=n)]
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "text": caps},
                                    features=feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return path


def run_audit(work: Path, data: Path, out: Path, processes: int | None, extra: list[str]) -> dict:
    """One audit as a subprocess (``accelerate launch`` when ``processes`` is given); its audit.json."""
    audit = ["-m", "memreg.cli", "audit", "--data", str(data), "--out", str(out), *extra]
    if processes is None:
        cmd = [sys.executable, *audit]
    else:
        multi = ["--multi_gpu"] if processes > 1 else []
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", *multi, "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29600 + processes), *audit]
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "hf_cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    if processes is not None and not _has_cuda():
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"audit failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads((out / "audit.json").read_text())


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def bench_processes(work: Path, rows: int) -> list[str]:
    from memreg.testing import build_tiny_sd

    model = build_tiny_sd(work / "tiny_sd", prediction_type="epsilon", seed=0)
    data = synthetic_parquet(work / f"scale_{rows}" / "data.parquet", rows, seed=1)
    extra = ["--model", str(model), "--shard-size", str(max(1, rows // 8)), "--calibration-images", "0"]
    res = {p: run_audit(work, data, work / f"scale_out_{p}", p, extra)["timing"] for p in (1, 2)}
    lines = [f"1 vs 2 processes, {rows} rows (tiny SD; rates over the busiest process's seconds):"]
    for key in ("images_per_s", "captions_per_s"):
        a, b = res[1][key], res[2][key]
        lines.append(f"  {key:15s} 1 proc {a:9.1f}   2 procs {b:9.1f}   ratio {b / a:5.2f}x")
    return lines


def bench_memory(work: Path, sizes: list[int]) -> list[str]:
    lines = ["memory of a one-process --no-score audit (MiB; RSS counts the mapped Arrow pages read, "
             "anon = RssAnon, the heap):"]
    base = None
    for n in sizes:
        data = synthetic_parquet(work / f"mem_{n}" / "data.parquet", n, seed=2)
        t0 = time.perf_counter()
        rep = run_audit(work, data, work / f"mem_out_{n}", None, ["--no-score", "--shard-size", "1024",
                                                                    "--calibration-images", "0"])
        m = rep["memory"]
        base = base or m
        ratio = lambda k: f"{m[k]:7.1f} ({m[k] / base[k]:.2f}x)"  # noqa: E731
        lines.append(f"  {n:>7d} rows: peak RSS after shards {ratio('peak_rss_mb_after_shards')}, overall "
                     f"{ratio('peak_rss_mb')} | anon at fullest shard {ratio('shard_rss_anon_mb_max')}, "
                     f"after merge {ratio('rss_anon_mb_after_merge')} | {rep['counts']['clusters']} clusters, "
                     f"{rep['timing']['images_per_s']:.0f} images/s, {time.perf_counter() - t0:.0f}s wall")
    return lines


BEFORE_THRESHOLD = 10  # bits of 64: the audit's one-pHash default before views


def _planted_codes(rng: np.random.Generator, n: int, views: int, nbytes: int,
                   hash_bytes: int | None = None) -> np.ndarray:
    """``n`` random codes (``views`` of ``nbytes`` a row) plus ``n // 10`` copies of random rows with
    4 bits of view 0's first ``hash_bytes`` (default all) flipped, the rest of view 0 (its colour
    grid) kept and their other views random: (n + n // 10, views, nbytes)."""
    codes = rng.integers(0, 256, size=(n, views, nbytes), dtype=np.uint8)
    src = rng.integers(0, n, size=n // 10)
    planted = rng.integers(0, 256, size=(len(src), views, nbytes), dtype=np.uint8)
    planted[:, 0] = codes[src, 0]
    for k, bits in enumerate(rng.integers(0, (hash_bytes or nbytes) * 8, size=(len(src), 4))):
        for b in bits:
            planted[k, 0, b // 8] ^= np.uint8(1 << (b % 8))
    return np.concatenate([codes, planted])


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_pairs(n: int, threshold: int) -> list[str]:
    from memreg.audit.near_dup import (CODE_BYTES, HASH_BYTES, HASH_MARGIN, INDEX_VIEWS, QUERY_VIEWS, VIEWS, near_pairs,
                                       near_pairs_bruteforce)

    single = _planted_codes(np.random.default_rng(3), n, 1, 8)[:, 0]
    multi, t_multi = _timed(_faiss_multihash_pairs, single, BEFORE_THRESHOLD)
    slow, t_slow = _timed(near_pairs_bruteforce, single, BEFORE_THRESHOLD)
    flat, t_flat = _timed(near_pairs, single, BEFORE_THRESHOLD)
    same = _pair_set(multi) == _pair_set(slow) == _pair_set(flat)
    views = _planted_codes(np.random.default_rng(3), n, len(VIEWS), CODE_BYTES, HASH_BYTES)
    fast_v, t_fast_v = _timed(near_pairs, views, threshold)
    m = min(len(views), 5000)   # numpy over all view pairs of 20k rows takes minutes: check on a prefix
    part, t_part = _timed(near_pairs, views[:m], threshold)
    slow_v, t_slow_v = _timed(near_pairs_bruteforce, views[:m], threshold)
    return [f"near-duplicate search, {len(single)} images (before: one 64-bit pHash a row, {BEFORE_THRESHOLD} bits; "
            f"after: {len(VIEWS)} views of {HASH_BYTES * 8} hash bits + a colour grid, hashes within "
            f"{threshold} + {HASH_MARGIN} bits, then the colour test):",
            f"  one pHash a row ({len(flat)} pairs, identical: {same}): faiss multi-hash {t_multi:.3f}s (before) | "
            f"all pairs: numpy {t_slow:.3f}s ({t_slow / t_multi:.1f}x), faiss IndexBinaryFlat {t_flat:.3f}s "
            f"({t_flat / t_multi:.2f}x)",
            f"  views ({len(QUERY_VIEWS)} query x {len(INDEX_VIEWS)} index codes a row, {len(fast_v)} pairs): "
            f"near_pairs (IndexBinaryFlat) {t_fast_v:.3f}s (after; {t_fast_v / t_multi:.2f}x the multi-hash before) | "
            f"first {m} rows: identical to numpy {_pair_set(part) == _pair_set(slow_v)}, near_pairs {t_part:.3f}s, "
            f"numpy {t_slow_v:.3f}s"]


def _pair_set(pairs: np.ndarray) -> set:
    return {tuple(p) for p in pairs.tolist()}


def _faiss_multihash_pairs(codes: np.ndarray, threshold: int, nhash: int = 4) -> np.ndarray:
    """All pairs within ``threshold`` by faiss's multi-index hash: the audit's search before views.

    ``nhash`` substrings of 16 bits; by pigeonhole two codes at distance ``d`` share a substring
    within ``d // nhash`` flips, so ``nflip = threshold // nhash`` finds every pair."""
    import faiss

    index = faiss.IndexBinaryMultiHash(codes.shape[1] * 8, nhash, codes.shape[1] * 8 // nhash)
    index.nflip = threshold // nhash
    index.add(codes)
    lims, _, ids = index.range_search(codes, threshold + 1)
    q = np.repeat(np.arange(len(codes), dtype=np.int64), np.diff(lims).astype(np.int64))
    keep = q < ids
    return np.stack([q[keep], ids[keep].astype(np.int64)], axis=1)


# scikit-image photos bundled with the package (no download); ``cat`` is ``chelsea``, and
# ``stereo_motorcycle``'s two views are near-duplicates of each other, so both are left out
RECALL_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
                 "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
                 "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text")
RECALL_TRANSFORMS = ("crop_centre", "crop_offcentre", "jpeg", "brightness", "contrast", "pad", "resize", "hflip",
                     "crop", "jitter")


def bench_hashing(side: int, repeat: int) -> list[str]:
    """Hashing rate (images/s) of one pHash vs the views, on the photos at ``side`` px."""
    from memreg.audit.near_dup import phash_code, view_codes
    from memreg.demo.data import load_photo

    photos = [load_photo(n, side) for n in RECALL_PHOTOS] * repeat
    _, t_one = _timed(lambda: [phash_code(p) for p in photos])
    _, t_views = _timed(lambda: [view_codes(p) for p in photos])
    _, t_native = _timed(lambda: [view_codes(p, min_side=0) for p in photos])
    _, t_shard = _timed(lambda: [(phash_code(p), view_codes(p)) for p in photos])
    m = len(photos)
    return [f"hashing {m} photos of {side} px: one pHash {m / t_one:.0f} images/s (before) | views "
            f"{m / t_views:.0f} images/s ({t_views / t_one:.2f}x the time; never scaled up "
            f"{m / t_native:.0f} images/s, {t_views / t_native:.2f}x) | a shard's row, pHash + views, "
            f"{m / t_shard:.0f} images/s ({t_shard / t_one:.2f}x)"]


def _planted(photos, transforms, seeds: int, rule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (M, V, B), owner, kind) of the photos and ``seeds`` copies of each per transform."""
    from memreg.audit.near_dup import planted_copy

    rng = np.random.default_rng(0)
    codes, owner, kind = [rule.hasher(p) for p in photos], list(range(len(photos))), ["original"] * len(photos)
    for k, p in enumerate(photos):
        for t in transforms:
            for _ in range(seeds):
                codes.append(rule.hasher(planted_copy(p, t, rng)))
                owner.append(k)
                kind.append(t)
    return np.stack(codes), np.array(owner), np.array(kind)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[1]


def recall_stats(codes, owner, kind, rule, threshold: int) -> dict:
    """Per-transform recall (copy matched to its original by the rule at ``threshold``), wrong pairs
    (different originals' images found as a pair) and originals sharing a cluster with another original."""
    from memreg.audit.near_dup import near_pairs, view_match

    copies = np.flatnonzero(kind != "original")
    hit = view_match(codes[copies], codes[owner[copies]], threshold, rule.query, rule.index)
    pairs = near_pairs(codes, threshold, rule.query, rule.index)
    comp = _components(len(codes), pairs)
    n_orig = int(np.sum(kind == "original"))
    _, per_comp = np.unique(comp[:n_orig], return_counts=True)
    return {"recall": {t: float(np.mean(hit[kind[copies] == t])) for t in dict.fromkeys(kind[copies])},
            "all": float(np.mean(hit)),
            "wrong_pairs": int(np.sum(owner[pairs[:, 0]] != owner[pairs[:, 1]])) if len(pairs) else 0,
            "merged_originals": int(per_comp[per_comp > 1].sum())}


def demo_false_pairs(n: int, resolution: int, rule, threshold: int, p_position: float = 0.0) -> tuple[int, int]:
    """(pairs found, all pairs) among ``n`` distinct procedural scenes of the demo world."""
    from memreg.audit.near_dup import near_pairs
    from memreg.demo.data import WorldConfig, scene_rows

    rows = scene_rows(n, np.random.default_rng(resolution), WorldConfig(p_position=p_position), resolution,
                      "s", "unique", set())
    codes = np.stack([rule.hasher(img) for img, _ in rows])
    return len(near_pairs(codes, threshold, rule.query, rule.index)), n * (n - 1) // 2


def demo_crop_recall(rule, threshold: int, per_photo: int = 24, seed: int = 100) -> dict[str, float]:
    """Per demo photo, the share of its web-world crops (``memreg.demo.data.photo_variant``: 88-95% of
    the side anywhere in the full photo, resized to 16 px) that the rule matches to the 16-px photo."""
    from memreg.audit.near_dup import view_match
    from memreg.demo.data import PHOTOS, load_photo, photo_variant

    rng = np.random.default_rng(seed)
    out = {}
    for name in PHOTOS:
        photo = rule.hasher(load_photo(name, 16))
        crops = np.stack([rule.hasher(photo_variant(name, 16, "crop", rng)) for _ in range(per_photo)])
        out[name] = float(np.mean(view_match(crops, photo[None], threshold, rule.query, rule.index)))
    return out


def bench_recall(side: int, seeds: int, threshold: int, scenes: int) -> list[str]:
    from memreg.audit.near_dup import (COLOUR_BOUND, HASH_MARGIN, LUMA_BOUND, PLAIN_RULE, TIGHT_COLOUR_BOUND,
                                       VIEW_RULE, Rule, view_codes)
    from memreg.demo.data import load_photo

    photos = [load_photo(n, side) for n in RECALL_PHOTOS]
    rules = {"before": PLAIN_RULE, "after": VIEW_RULE}
    bits = {"before": BEFORE_THRESHOLD, "after": threshold}
    stats = {k: recall_stats(*_planted(photos, RECALL_TRANSFORMS, seeds, r), r, bits[k]) for k, r in rules.items()}
    lines = [f"near-duplicate recall: {len(photos)} scikit-image photos of {side} px, {seeds} copies each per "
             f"transformation (before: one 64-bit pHash a row, {BEFORE_THRESHOLD} bits; after: the views, "
             f"hash <= {threshold} of 128 bits and colour <= {COLOUR_BOUND}, or hash <= {threshold + HASH_MARGIN}, "
             f"colour <= {TIGHT_COLOUR_BOUND} and light <= {LUMA_BOUND})",
             "  | transformation | before | after |", "  |---|---|---|"]
    for t in RECALL_TRANSFORMS:
        lines.append(f"  | {t} | {stats['before']['recall'][t]:.2f} | {stats['after']['recall'][t]:.2f} |")
    lines.append(f"  | all | {stats['before']['all']:.3f} | {stats['after']['all']:.3f} |")
    for key in ("wrong_pairs", "merged_originals"):
        lines.append(f"  | {key.replace('_', ' ')} | {stats['before'][key]} | {stats['after'][key]} |")
    native = Rule(lambda img: view_codes(img, min_side=0), VIEW_RULE.query, VIEW_RULE.index)
    crops = {k: demo_crop_recall(r, bits[k]) for k, r in rules.items()}
    crops["native"] = demo_crop_recall(native, threshold)
    order = ("before", "native", "after")
    lines.append("the web world's 16-px crops joined to their photo, 24 a photo (before | views never scaled "
                 "up | after):")
    lines.append("  " + ", ".join(f"{n} " + " | ".join(f"{crops[k][n]:.2f}" for k in order) for n in crops["after"]))
    lines.append("  all " + " | ".join(f"{np.mean(list(crops[k].values())):.3f}" for k in order))
    lines.append(f"false pairs among {scenes} distinct demo scenes (pairs found / all pairs):")
    for res in (16, 32):
        for p_pos in (0.0, 1.0):
            got = {k: demo_false_pairs(scenes, res, r, bits[k], p_pos) for k, r in rules.items()}
            total = got["before"][1]
            lines.append(f"  {res} px, p_position {p_pos}: before {got['before'][0]} ({got['before'][0] / total:.2e}) "
                         f"| after {got['after'][0]} ({got['after'][0] / total:.2e})")
    return lines


def main(argv=None) -> int:
    from memreg.audit.near_dup import DEFAULT_THRESHOLD

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--scale-rows", type=int, default=512, help="0: skip the 1 vs 2 processes run")
    p.add_argument("--mem-rows", type=int, nargs="*", default=[10_000, 100_000], help="none: skip")
    p.add_argument("--pairs-rows", type=int, default=20_000, help="0: skip the near-duplicate search")
    p.add_argument("--recall", action="store_true", help="recall per planted transformation, before vs after")
    p.add_argument("--recall-side", type=int, default=128, help="photo side for --recall and the hashing rate")
    p.add_argument("--recall-seeds", type=int, default=3, help="copies per photo and transformation")
    p.add_argument("--demo-scenes", type=int, default=400, help="demo scenes for the false-pair rate")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if args.pairs_rows:
            print("\n".join(bench_pairs(args.pairs_rows - args.pairs_rows // 11, DEFAULT_THRESHOLD)), flush=True)
            print("\n".join(bench_hashing(512, 10) + bench_hashing(args.recall_side, 10)), flush=True)
        if args.recall:
            print("\n".join(bench_recall(args.recall_side, args.recall_seeds, DEFAULT_THRESHOLD, args.demo_scenes)),
                  flush=True)
        if args.mem_rows:
            print("\n".join(bench_memory(work, args.mem_rows)), flush=True)
        if args.scale_rows:
            print("\n".join(bench_processes(work, args.scale_rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
