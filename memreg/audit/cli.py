"""``memreg audit --data D --model M --out DIR``: the pre-flight memorization-risk report.

Runs as one process, or sharded under ``accelerate launch -m memreg.cli audit ...``: each process
audits its shards (:mod:`memreg.audit.shards`), then the main process merges them
(:mod:`memreg.audit.merge`) and writes ``audit.json``, ``clusters.jsonl``, ``captions.jsonl``,
``unreadable.jsonl`` and ``audit.html``. A run started again on the same ``--out`` with the same
settings skips the shards already finished; results do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from memreg.audit import merge, outputs
from memreg.audit.near_dup import CALIBRATION_COPIES, DEFAULT_THRESHOLD, calibrate, hash_settings
from memreg.audit.scoring import CaptionScorer, ScoreSettings, check_model
from memreg.audit.shards import PARTS_DIR, read_header, run_shards, shard_ranges
from memreg.audit.source import AuditInputError, AuditSource, open_rgb
from memreg.errors import MemregError
from memreg.score import PRESETS
from memreg.sharding import (apply_plan, busiest_seconds, peak_rss_mb, plan_out, process_state,
                             rss_anon_mb)

OUTPUT_FILES = ("audit.json", "clusters.jsonl", "captions.jsonl", "unreadable.jsonl", "audit.html")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="imagefolder with metadata.jsonl, a saved `datasets` dataset, "
                   "or parquet/webdataset shards")
    p.add_argument("--model", default=None, help="base SD pipeline (diffusers dir or hub id) for the caption score")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--split", default="train")
    p.add_argument("--no-score", action="store_true", help="skip the per-caption score (no --model needed)")
    p.add_argument("--phash-threshold", type=int, default=DEFAULT_THRESHOLD,
                   help="near-duplicate: a view's pHash+dHash within this many bits of 128 of a view of the other "
                   f"image (views: the image, its mirror, 90%% windows; memreg.audit.near_dup; default {DEFAULT_THRESHOLD})")
    p.add_argument("--min-cluster", type=int, default=2, help="clusters of at least this many rows are listed")
    p.add_argument("--calibration-images", type=int, default=64,
                   help="images of the dataset that get planted copies to measure recall/precision (0: skip)")
    p.add_argument("--shard-size", type=int, default=1024, help="rows per shard (the unit of resume)")
    p.add_argument("--seeds", type=int, default=1, help="noise draws per caption")
    p.add_argument("--batch-size", type=int, default=16, help="captions per UNet call")
    p.add_argument("--preset", choices=sorted(PRESETS), default="sd1")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default float16 on cuda)")
    p.add_argument("--top-k", type=int, default=20, help="highest-scoring captions listed besides repeats; "
                   "clusters shown in audit.html")
    p.add_argument("--overwrite", action="store_true", help="replace a finished report in --out")
    p.add_argument("--allow-external-files", action="store_true",
                   help="let metadata.jsonl name files outside --data (../ paths, symbolic links); refused by default")


def run(args: argparse.Namespace) -> int:
    try:
        run_audit(args)
    except MemregError as e:
        print(f"memreg audit: error: {e}", file=sys.stderr)
        return 2
    return 0


def _validate(args) -> None:
    for name, low in (("shard_size", 1), ("seeds", 1), ("batch_size", 1), ("min_cluster", 2),
                      ("calibration_images", 0), ("top_k", 0)):
        if getattr(args, name) < low:
            raise AuditInputError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not 0 <= args.phash_threshold <= 32:
        raise AuditInputError(f"--phash-threshold must be in [0, 32] bits, got {args.phash_threshold}")
    if args.model is None and not args.no_score:
        raise AuditInputError("--model is required for the caption score (or pass --no-score)")
    if args.model is not None and not args.no_score:
        check_model(args.model)


def fingerprint(args, num_rows: int) -> dict:
    """The settings a shard's content depends on; finished shards are reused only under the same."""
    model = None if args.no_score else (str(Path(args.model).resolve()) if Path(args.model).exists() else args.model)
    return {"data": str(Path(args.data).resolve()), "rows": num_rows, "split": args.split,
            "image_column": args.image_column, "caption_column": args.caption_column,
            "shard_size": args.shard_size, "model": model, "seeds": args.seeds,
            "batch_size": args.batch_size, "preset": args.preset, "dtype": args.dtype, "near_dup": hash_settings()}


def release_arrow_memory() -> None:
    """Make Arrow allocate with the system ``malloc`` in this (CLI) process.

    Arrow's default mimalloc pool keeps the pages freed after ``datasets`` converts parquet/images
    to its Arrow cache: measured on the first audit of a 10k-row parquet, ~3 KB a row of anonymous
    memory held for the rest of the run (none with the system pool), which made peak memory grow
    with N although no row is held.
    """
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def run_audit(args: argparse.Namespace) -> dict | None:
    """The whole run on this process; the main process returns the audit.json dict."""
    state = process_state()
    _validate(args)
    release_arrow_memory()
    with state.main_process_first():  # the imagefolder/parquet Arrow cache is built once
        source = AuditSource(args.data, args.image_column, args.caption_column, args.split,
                             allow_external_files=args.allow_external_files)
    out = Path(args.out)
    fp = fingerprint(args, len(source))
    action = plan_out(out, fp, args.overwrite, OUTPUT_FILES, "an audit")
    if state.is_main_process:
        apply_plan(out, fp, action)
    state.wait_for_everyone()
    settings = None if args.no_score else ScoreSettings(args.model, tuple(range(args.seeds)), args.batch_size,
                                                        args.preset, args.dtype)
    t0 = time.perf_counter()
    done = run_shards(source, out, args.shard_size, state.process_index, state.num_processes,
                      lambda: None if settings is None else CaptionScorer(settings, state.device))
    print(f"memreg audit: process {state.process_index}/{state.num_processes}: {len(done['done'])} shard(s) "
          f"audited, {len(done['skipped'])} already finished, {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    shard_peak = peak_rss_mb()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    report = build_report(args, source, out, fp, shard_peak, state.num_processes)
    print(summary_line(report))
    return report


def _calibration(args, source: AuditSource, labels: np.ndarray) -> dict:
    """Planted copies of the first ``--calibration-images`` clusters' first images."""
    reps = np.unique(labels[labels >= 0])[:args.calibration_images]
    if args.calibration_images == 0 or len(reps) < 2:
        return {"skipped": "needs --calibration-images >= 2 and 2 distinct readable images"}
    images = [open_rgb(source.row(int(i)).image) for i in reps]
    return calibrate(images, args.phash_threshold, per_image=CALIBRATION_COPIES).to_dict()


def _throughput(out: Path, num_shards: int) -> dict:
    """images/s and captions/s of the shard phase: work over the busiest process's seconds."""
    heads = [read_header(out, k) for k in range(num_shards)]
    hash_s, score_s = (busiest_seconds(out / PARTS_DIR, num_shards, key) for key in ("hash_s", "score_s"))
    rows = sum(h["stop"] - h["start"] for h in heads)
    caps = sum(h["captions_scored"] for h in heads)
    anon = [h["rss_anon_mb"] for h in heads if h.get("rss_anon_mb") is not None]
    return {"processes": len({h["rank"] for h in heads}), "hash_s": hash_s, "score_s": score_s,
            "images_per_s": rows / hash_s if hash_s > 0 else None,
            "captions_per_s": caps / score_s if score_s > 0 else None, "captions_scored": caps,
            "shard_peak_rss_mb": max(h["peak_rss_mb"] for h in heads),
            "shard_rss_anon_mb_max": max(anon) if anon else None}


def build_report(args, source: AuditSource, out: Path, fp: dict, shard_peak: float, world: int) -> dict:
    """Merge the shards and write every output file; returns the audit.json dict."""
    n = len(source)
    t0 = time.perf_counter()
    idx = merge.read_index(out, n, args.shard_size, out / "unreadable.jsonl")
    if idx.unreadable == n:  # as training refuses it: an audit of nothing is no all-clear
        raise AuditInputError(f"--data {args.data!r}: none of its {n} images could be read; the causes are "
                              f"listed in {out / 'unreadable.jsonl'}")
    labels, n_pairs, n_images = merge.cluster_rows(idx, args.phash_threshold)
    table = merge.rank_clusters(idx, labels, args.min_cluster)
    members, groups = outputs.collect(out, n, args.shard_size, labels, table,
                                      outputs.wanted_captions(idx, args.top_k))
    clusters = outputs.cluster_lines(table, members)
    outputs.write_jsonl(out / "clusters.jsonl", clusters)
    outputs.write_jsonl(out / "captions.jsonl", outputs.caption_lines(groups))
    merge_s = time.perf_counter() - t0
    timing = _throughput(out, len(shard_ranges(n, args.shard_size)))
    with (out / "unreadable.jsonl").open(encoding="utf-8") as f:
        unreadable = [json.loads(line) for _, line in zip(range(merge.MAX_LISTED), f)]
    report = {
        "command": "audit",
        "data": {"path": args.data, "rows": n, "image_column": args.image_column,
                 "caption_column": args.caption_column, "split": args.split},
        "model": fp["model"],
        "settings": {k: fp[k] for k in ("shard_size", "seeds", "batch_size", "preset", "dtype")}
        | {"phash_threshold": args.phash_threshold, "min_cluster": args.min_cluster, "score": not args.no_score},
        "counts": {"rows": n, "unreadable": idx.unreadable, "distinct_images": n_images,
                   "near_duplicate_pairs": n_pairs,
                   "clusters": len(table.label), "rows_in_clusters": int(table.size.sum()),
                   "clusters_with_near_duplicates": int((table.images > 1).sum()),
                   "captions": merge.caption_groups(idx)},
        "calibration": _calibration(args, source, labels),
        "top_clusters": [{k: c[k] for k in ("rank", "cluster", "size", "images", "risk", "max_score", "captions")}
                         for c in clusters[:args.top_k]],
        "unreadable": unreadable,
        "timing": timing | {"merge_s": merge_s},
        # peak RSS counts the memory-mapped Arrow pages read; RssAnon (heap) is what grows with held rows
        "memory": {"peak_rss_mb_after_shards": shard_peak, "peak_rss_mb": peak_rss_mb(),
                   "shard_rss_anon_mb_max": timing["shard_rss_anon_mb_max"], "rss_anon_mb_after_merge": rss_anon_mb()},
    }
    (out / "audit.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    outputs.write_html(out / "audit.html", source, clusters, report, top=args.top_k)
    return report


def summary_line(report: dict) -> str:
    c, cal, t = report["counts"], report["calibration"], report["timing"]
    cal_s = (f"planted copies at {cal['threshold']} bits: recall {cal['recall']:.3f}, precision {cal['precision']:.3f}"
             if "recall" in cal else f"calibration {cal['skipped']}")
    ips = f"{t['images_per_s']:.0f} images/s" if t["images_per_s"] else "n/a images/s"
    cps = f"{t['captions_per_s']:.1f} captions/s" if t["captions_per_s"] else "no scoring"
    return (f"memreg audit: {c['rows']} rows, {c['unreadable']} unreadable, {c['clusters']} clusters "
            f"({c['rows_in_clusters']} rows, {c['clusters_with_near_duplicates']} with near-duplicates), "
            f"{c['captions']['normalized']['repeated']} repeated captions (normalised); {cal_s}; {ips}, {cps} "
            f"over {t['processes']} process(es)")
