#!/usr/bin/env python
"""Build the tiny offline SD pipeline used by tests, configs/tiny_cpu.yaml and benchmarks.

    python scripts/make_tiny_sd.py out/tiny_sd [--prediction-type epsilon|v_prediction] [--seed N] [--sample-size S]

Images are ``2 * sample_size`` pixels (default 16 -> 32 px).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-size", type=int, default=16)
    args = ap.parse_args(argv)
    from memreg.testing import build_tiny_sd

    out = build_tiny_sd(args.out_dir, prediction_type=args.prediction_type, seed=args.seed,
                        sample_size=args.sample_size)
    print(out)
    return out


if __name__ == "__main__":
    main()
