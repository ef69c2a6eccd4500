"""Work cut into fixed shards, split across accelerate processes, resumable (audit and detect).

``N`` items are cut into shards of ``shard_size`` consecutive items; the cut does not depend on
the number of processes, so neither do the results. Process ``r`` of ``W`` takes shards
``r, r+W, r+2W, ...``. A shard's result is a JSONL *part* ``parts/shard-NNNNN.jsonl``: a header
line (``shard``, ``start``, ``stop``, ``rank``, ``peak_rss_mb``, ``rss_anon_mb`` plus the
caller's fields), then one line per item. It is written to a temporary file and renamed, so a
part that exists is complete: a killed run, started again, skips those shards. Parts are reused
only under the settings recorded in ``parts/fingerprint.json`` (:func:`plan_out`).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

from memreg.errors import MemregError

PARTS_DIR = "parts"
FINGERPRINT_FILE = "fingerprint.json"

# work(start, stop) -> (header fields, item dicts) of one shard
ShardWork = Callable[[int, int], "tuple[dict, Iterable[dict]]"]


class OutDirError(MemregError, ValueError):
    """``--out`` holds finished outputs or parts of other settings; one line, the CLI exits with 2."""


def process_state():
    """accelerate's ``PartialState``; under ``accelerate launch --multi_gpu`` without GPUs the
    processes run on CPU over gloo (as training does)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())


def shard_ranges(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive items; independent of the process count."""
    return [(lo, min(lo + shard_size, num_items)) for lo in range(0, num_items, shard_size)]


def my_shards(num_shards: int, rank: int, world: int) -> list[int]:
    return list(range(rank, num_shards, world))


def part_path(parts: Path, k: int) -> Path:
    return parts / f"shard-{k:05d}.jsonl"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; file-backed pages such as a
    memory-mapped Arrow table included)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def rss_anon_mb() -> float | None:
    """Current anonymous resident memory (MiB; ``RssAnon`` of /proc/self/status): the heap and
    other private allocations, without file-backed pages. None where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def write_part(parts: Path, k: int, header: dict, items: Iterable[dict]) -> None:
    """Write part ``k`` atomically (temporary file, then rename)."""
    path = part_path(parts, k)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for x in items:
            f.write(json.dumps(x, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_part(parts: Path, k: int) -> tuple[dict, Iterator[dict]]:
    """(header, iterator over item dicts) of a finished part; items are read lazily."""
    f = part_path(parts, k).open(encoding="utf-8")
    header = json.loads(f.readline())

    def items():
        with f:
            for line in f:
                yield json.loads(line)
    return header, items()


def read_header(parts: Path, k: int) -> dict:
    with part_path(parts, k).open(encoding="utf-8") as f:
        return json.loads(f.readline())


def run_shards(parts: Path, num_items: int, shard_size: int, rank: int, world: int,
               make_work: Callable[[], ShardWork], progress=None) -> dict:
    """Do this process's unfinished shards; returns ``{"done": [...], "skipped": [...]}``.

    ``make_work()`` (e.g. loading a model) is called only when a shard is left to do.
    """
    ranges = shard_ranges(num_items, shard_size)
    mine = my_shards(len(ranges), rank, world)
    todo = [k for k in mine if not part_path(parts, k).exists()]
    work = make_work() if todo else None
    for k in todo:
        start, stop = ranges[k]
        fields, items = work(start, stop)
        header = {"shard": k, "start": start, "stop": stop, **fields, "rank": rank,
                  "peak_rss_mb": peak_rss_mb(), "rss_anon_mb": rss_anon_mb()}
        write_part(parts, k, header, items)
        if progress is not None:
            progress.update(stop - start)
    return {"done": todo, "skipped": [k for k in mine if k not in todo]}


def busiest_seconds(parts: Path, num_shards: int, key: str) -> float:
    """The largest per-process sum of header field ``key`` over the parts (the phase's wall time
    when processes run side by side)."""
    per_rank: dict[int, float] = {}
    for k in range(num_shards):
        h = read_header(parts, k)
        per_rank[h["rank"]] = per_rank.get(h["rank"], 0.0) + h[key]
    return max(per_rank.values())


def plan_out(out: Path, fingerprint: dict, overwrite: bool, output_files: Iterable[str], what: str) -> str:
    """"fresh" | "resume" | "clear": what to do with ``out`` (read-only; the same on every process).

    Raises :class:`OutDirError` when ``out`` already holds finished ``output_files`` (without
    ``overwrite``) or parts written under other settings than ``fingerprint`` (of ``what``, e.g.
    "an audit"), so nothing a user produced is replaced silently.
    """
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {str(out)!r} exists and is not a directory")
    done = [f for f in output_files if (out / f).exists()]
    if done and not overwrite:
        raise OutDirError(f"--out {str(out)!r} already has {', '.join(done)}; pass --overwrite to replace "
                          "(finished shards with the same settings are reused)")
    fp_file = out / PARTS_DIR / FINGERPRINT_FILE
    if not fp_file.exists():
        return "fresh"
    if json.loads(fp_file.read_text()) == fingerprint:
        return "resume"
    if not overwrite:
        raise OutDirError(f"--out {str(out)!r} has shards of {what} with other settings "
                          f"({fp_file}); pass --overwrite to discard them")
    return "clear"


def apply_plan(out: Path, fingerprint: dict, action: str) -> Path:
    """Carry out :func:`plan_out`'s ``action`` (main process only); returns the parts directory."""
    parts = out / PARTS_DIR
    if action == "clear":
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1) + "\n")
    return parts
