"""The audit's report: merge the shards of a ``memreg audit`` run and write its output files.

:func:`build_report` reads the finished shards under ``--out`` (:mod:`memreg.audit.shards`), ranks
the clusters (:mod:`memreg.audit.merge`) and writes ``clusters.jsonl``, ``captions.jsonl``,
``audit.json`` and ``audit.html`` (:mod:`memreg.audit.outputs`); :func:`summary_line` is the
one-line result the command prints. The command (:mod:`memreg.commands.audit`) runs the shards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from memreg.audit import merge, outputs
from memreg.audit.near_dup import CALIBRATION_COPIES, calibrate
from memreg.audit.shards import read_header
from memreg.audit.source import AuditInputError, AuditSource, open_rgb
from memreg.sharding import PARTS_DIR, busiest_seconds, peak_rss_mb, rss_anon_mb, shard_ranges

OUTPUT_FILES = ("audit.json", "clusters.jsonl", "captions.jsonl", "unreadable.jsonl", "audit.html")


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


def build_report(args, source: AuditSource, out: Path, fp: dict, shard_peak: float) -> dict:
    """Merge the shards and write every output file; returns the audit.json dict.

    ``args``: the audit's settings as ``memreg audit`` parses them (data, columns, split, shard_size,
    phash_threshold, min_cluster, calibration_images, top_k, no_score); ``fp``: the run's
    fingerprint (model and score settings)."""
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
