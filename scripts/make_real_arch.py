#!/usr/bin/env python
"""Build a random-weight pipeline at a published architecture (memreg/arch) and print its cost.

    python scripts/make_real_arch.py sd15 out/sd15_arch [--sample-size 8] [--blocks 1] [--seed 0]

FAMILY: sd15 | sd21 | sdxl. ``--sample-size`` is the UNet's latent size (8: 64 px images);
``--blocks`` caps the transformer blocks per attention (SDXL full fine-tuning on 24 GiB: 1).
Prints the build's wall time, the process's peak resident memory and the parameter counts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memreg.arch.build import FAMILIES, build_pipeline_dir  # noqa: E402
from memreg.errors import MemregError  # noqa: E402


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("family", choices=FAMILIES)
    ap.add_argument("out", help="output dir (absent or empty)")
    ap.add_argument("--sample-size", type=int, default=8, help="UNet latent size (images: 8x that in px)")
    ap.add_argument("--blocks", type=int, default=None, help="cap on transformer blocks per attention")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        out = build_pipeline_dir(args.family, args.out, sample_size=args.sample_size, blocks=args.blocks,
                                 seed=args.seed)
    except MemregError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / "memreg_arch.json").read_text())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
    params = ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in info["params"].items())
    print(f"built {args.family} (latent {args.sample_size}, {info['resolution']} px, blocks {args.blocks}) at {out}: "
          f"{time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_gib():.2f} GiB, {size:.2f} GiB on disk; {params}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
