"""Benchmark ``memreg audit`` in one run and print ratios.

    python scripts/bench_audit.py [--work DIR] [--scale-rows 512] [--mem-rows 10000 100000] [--pairs-rows 20000]

1. captions/s and images/s for 1 vs 2 processes (``accelerate launch``, CPU/gloo where there is
   no GPU) on ``--scale-rows`` synthetic rows with the tiny SD pipeline of ``memreg.testing``;
2. memory of a one-process ``--no-score`` audit at each of ``--mem-rows``: peak RSS after the
   shard phase and overall, and the anonymous RSS (``RssAnon``: heap, no file-backed pages) at
   the end of the fullest shard and after the merge. Peak RSS also counts the pages of the
   memory-mapped Arrow table the audit has read (the kernel can drop them; they grow with N), so
   the anonymous figure is the one that shows whether per-row data is held (should stay flat;
   the merge adds the hash index);
3. near-duplicate search at ``--pairs-rows`` codes: faiss multi-index hash vs all pairs, both as
   vectorised numpy (``near_pairs_bruteforce``) and as faiss's compiled brute force
   (``IndexBinaryFlat.range_search``); all three give the same pairs.

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


def bench_pairs(n: int, threshold: int) -> list[str]:
    from memreg.audit.near_dup import near_pairs, near_pairs_bruteforce

    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, size=(n, 8), dtype=np.uint8)
    src = rng.integers(0, n, size=n // 10)
    flips = rng.integers(0, 64, size=(len(src), 4))
    planted = codes[src].copy()
    for k, bits in enumerate(flips):
        for b in bits:
            planted[k, b // 8] ^= np.uint8(1 << (b % 8))
    codes = np.concatenate([codes, planted])
    t0 = time.perf_counter()
    fast = near_pairs(codes, threshold)
    t1 = time.perf_counter()
    slow = near_pairs_bruteforce(codes, threshold)
    t2 = time.perf_counter()
    flat = _faiss_flat_pairs(codes, threshold)
    t3 = time.perf_counter()
    same = {tuple(p) for p in fast} == {tuple(p) for p in slow} == {tuple(p) for p in flat}
    return [f"near-duplicate search, {len(codes)} codes, threshold {threshold}, {len(fast)} pairs, identical: {same}",
            f"  faiss multi-hash {t1 - t0:.3f}s | all pairs: numpy {t2 - t1:.3f}s ({(t2 - t1) / (t1 - t0):.1f}x the "
            f"multi-hash), faiss IndexBinaryFlat {t3 - t2:.3f}s ({(t3 - t2) / (t1 - t0):.2f}x the multi-hash)"]


def _faiss_flat_pairs(codes: np.ndarray, threshold: int) -> np.ndarray:
    """All pairs within ``threshold`` by faiss's compiled brute force (the fair all-pairs baseline)."""
    import faiss

    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    lims, _, ids = index.range_search(codes, threshold + 1)
    q = np.repeat(np.arange(len(codes), dtype=np.int64), np.diff(lims).astype(np.int64))
    keep = q < ids
    return np.stack([q[keep], ids[keep].astype(np.int64)], axis=1)


def main(argv=None) -> int:
    from memreg.audit.near_dup import DEFAULT_THRESHOLD

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--scale-rows", type=int, default=512, help="0: skip the 1 vs 2 processes run")
    p.add_argument("--mem-rows", type=int, nargs="*", default=[10_000, 100_000], help="none: skip")
    p.add_argument("--pairs-rows", type=int, default=20_000, help="0: skip the near-duplicate search")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if args.pairs_rows:
            print("\n".join(bench_pairs(args.pairs_rows - args.pairs_rows // 11, DEFAULT_THRESHOLD)), flush=True)
        if args.mem_rows:
            print("\n".join(bench_memory(work, args.mem_rows)), flush=True)
        if args.scale_rows:
            print("\n".join(bench_processes(work, args.scale_rows)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
