#!/usr/bin/env python
"""What verified resume costs on a large checkpoint: the content hashes and the tensors-only state check.

    python scripts/bench_checkpoint.py --gb 3 --dir /tmp/bench_ckpt

Writes a checkpoint-shaped directory of ``--gb`` GB (weights as safetensors, optimizer state as a
torch zip file, as accelerate saves it), then times, side by side in one run: writing it, the
completeness marker's sha256 of every file (once per save), the marker's check at resume (sizes
and hashes), and the tensors-only load check of the optimizer state (memory-mapped) against a
plain full ``torch.load``. ``--cold`` drops the page cache before each read (root only), so the
reads come from the disk as after a reboot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from memreg.training import checkpoint as ckpt  # noqa: E402


def _drop_caches(cold: bool) -> None:
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _write_checkpoint(d: Path, n: int) -> float:
    """Seconds to write ``n`` float32 weights (safetensors) and 2n of Adam state (torch.save), synced."""
    weights = {f"w{i}": torch.randn(n // 8) for i in range(8)}
    optim = {"state": {i: {"exp_avg": torch.randn(n // 8), "exp_avg_sq": torch.rand(n // 8)} for i in range(8)},
             "param_groups": [{"lr": 1e-4, "params": list(range(8))}]}
    t0 = time.perf_counter()
    save_file(weights, str(d / ckpt.LORA_WEIGHT_NAME))
    torch.save(optim, d / "optimizer.bin")
    os.sync()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=3.0, help="total checkpoint size (1/3 weights, 2/3 optimizer)")
    ap.add_argument("--dir", default="/tmp/memreg_bench_ckpt")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each read (needs root)")
    args = ap.parse_args(argv)
    d = Path(args.dir) / "checkpoint-1"
    shutil.rmtree(d.parent, ignore_errors=True)
    d.mkdir(parents=True)
    write_s = _write_checkpoint(d, int(args.gb * 2**30 / 4 / 3))
    size = sum(f.stat().st_size for f in d.iterdir()) / 2**30
    _drop_caches(args.cold)
    marker_s = _timed(lambda: ckpt._write_marker(d, 1, 1))
    _drop_caches(args.cold)
    verify_s = _timed(lambda: ckpt.completeness_problem(d, content=True))
    _drop_caches(args.cold)
    check_s = _timed(lambda: ckpt.load_tensors_only(d / "optimizer.bin"))
    _drop_caches(args.cold)
    full_s = _timed(lambda: torch.load(d / "optimizer.bin", weights_only=True))
    print(f"checkpoint of {size:.2f} GiB ({'cold' if args.cold else 'warm'} page cache), {os.cpu_count()} CPUs:")
    print(f"  write (safetensors + torch.save + sync)   {write_s:6.2f} s (1.00x)")
    print(f"  marker at save: sha256 of every file      {marker_s:6.2f} s ({marker_s / write_s:.2f}x the write)")
    print(f"  marker check at resume (sizes + sha256)   {verify_s:6.2f} s ({verify_s / write_s:.2f}x the write)")
    print(f"  optimizer tensors-only check (mmap)       {check_s:6.2f} s | full torch.load {full_s:.2f} s "
          f"({check_s / full_s:.2f}x)")
    shutil.rmtree(d.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
