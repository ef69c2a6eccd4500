"""``memreg audit --data D --model M --out DIR``: the pre-flight memorization-risk report.

Runs as one process, or sharded under ``accelerate launch -m memreg.cli audit ...``: each process
audits its shards (:mod:`memreg.audit.shards`), then the main process merges them and writes
``audit.json``, ``clusters.jsonl``, ``captions.jsonl``, ``unreadable.jsonl`` and ``audit.html``
(:mod:`memreg.audit.report`). A run started again on the same ``--out`` with the same settings
skips the shards already finished; results do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyarrow as pa

from memreg.audit.near_dup import DEFAULT_THRESHOLD, hash_settings
from memreg.audit.report import OUTPUT_FILES, build_report, summary_line
from memreg.audit.scoring import CaptionScorer, ScoreSettings, check_model
from memreg.audit.shards import run_shards
from memreg.audit.source import AuditInputError, AuditSource
from memreg.score import PRESETS
from memreg.sharding import apply_plan, peak_rss_mb, plan_out, process_state


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="imagefolder with metadata.jsonl, a saved `datasets` dataset, "
                   "or parquet/webdataset shards")
    p.add_argument("--model", default=None, help="base pipeline, SD 1.x/2.x or SDXL (diffusers dir or hub id), for the caption score")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--split", default="train")
    p.add_argument("--no-score", action="store_true", help="skip the per-caption score (no --model needed)")
    p.add_argument("--phash-threshold", type=int, default=DEFAULT_THRESHOLD,
                   help="near-duplicate: a view's pHash+dHash within this many bits of 128 of a view of the other "
                   "image with agreeing colour grids, or within it plus a margin with closely agreeing colours "
                   f"(views: the image, its mirror, 90%% windows; memreg.audit.near_dup; default {DEFAULT_THRESHOLD})")
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


def validate(args) -> None:
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
    """Make Arrow allocate with the system ``malloc`` in this (command) process.

    Arrow's default mimalloc pool keeps the pages freed after ``datasets`` converts parquet/images
    to its Arrow cache, so the anonymous memory of an audit would grow with the number of rows
    although no row is held; the system pool returns them.
    """
    pa.set_memory_pool(pa.system_memory_pool())


def run(args: argparse.Namespace) -> int:
    """The whole run on this process; the main process merges the shards and prints the summary."""
    state = process_state()
    validate(args)
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
    if state.is_main_process:
        print(summary_line(build_report(args, source, out, fp, shard_peak)))
    return 0
