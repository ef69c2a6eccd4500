"""Cost of the guard's base-value cache (``guard.reference_source: cache``) by training-set size.

The cache holds every distinct dataset wording's base-model value on ``reference_draws`` fixed
noises; a probe of an augmented caption (shuffled or dropped tags, an empty prompt) is probed with its
row's dataset wording, so the cache needs no entry per augmented string. Built once, at calibration:
wordings x draws x 2 no-grad UNet samples (the norm term). Per size this prints the build's wall time,
its UNet samples per second, and the memory the cache holds (values, the wording index, the caption
strings, measured by tracemalloc), then a linear extrapolation to 1M rows from the largest size.

    .venv/bin/python scripts/bench_reference.py --rows 1000 10000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from memreg.guards import GuardContext, build_guard  # noqa: E402
from memreg.guards.anisotropy_gate.reference import BaseReferenceCache, build_base_cache  # noqa: E402
from memreg.models import load_components  # noqa: E402
from memreg.testing import build_tiny_sd  # noqa: E402

WORDS = ["red", "blue", "green", "black", "white", "circle", "square", "cross", "disc", "box", "large", "small"]


def captions(n: int) -> list[str]:
    """``n`` distinct captions of 6 tags (kohya-style comma-separated)."""
    g = torch.Generator().manual_seed(0)
    return [", ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (6,), generator=g)) + f", item {i}"
            for i in range(n)]


def measure(comps, n: int, draws: int, batch_size: int) -> dict:
    caps = captions(n)
    u = comps.unet.config
    ctx = GuardContext.for_models(comps.unet, comps.scheduler, comps.tokenizer, comps.text_encoder,
                                  latent_shape=(u.in_channels, u.sample_size, u.sample_size), train_captions=caps,
                                  batch_size=batch_size)
    guard = build_guard({"type": "anisotropy_gate", "reference_draws": draws}, ctx)
    cache = BaseReferenceCache(draws, seed=0)
    tracemalloc.start()
    t0 = time.perf_counter()
    build_base_cache(cache, ctx, guard.probes)
    seconds = time.perf_counter() - t0
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    samples = n * draws * 2
    return {"rows": n, "seconds": seconds, "samples_per_s": samples / seconds, "held_mb": held / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        comps = load_components(str(build_tiny_sd(Path(tmp) / "sd")), with_vae=False)
        results = [measure(comps, n, args.draws, args.batch_size) for n in args.rows]
    print(f"base-value cache (tiny UNet, CPU, {args.draws} draws; {torch.get_num_threads()} threads)")
    for r in results:
        print(f"{r['rows']:>9d} rows: {r['seconds']:8.1f} s  {r['samples_per_s']:8.0f} UNet samples/s  "
              f"held {r['held_mb']:7.2f} MB")
    last = results[-1]
    k = 1_000_000 / last["rows"]
    print(f"{1_000_000:>9d} rows (x{k:g} of {last['rows']}, linear): {last['seconds'] * k / 60:8.1f} min, "
          f"held {last['held_mb'] * k:7.1f} MB; UNet samples {2 * args.draws * 1_000_000:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
