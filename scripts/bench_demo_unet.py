#!/usr/bin/env python
"""What the demo's UNet shape and batch cost: a training step and a sampling forward, side by side.

    python scripts/bench_demo_unet.py [--shapes 32,64,64:2@8 32,64,64:2@16 32,64,64:1@8 32,64:1@8]
                                      [--batches 32 16] [--reps 3] [--steps 6] [--threads 1]

A shape is ``channels:attention_levels[:head_dim][@latent_side]`` (``memreg.testing.tiny_unet``; the
demo's base model is ``32,64,64:2@8``: ``base:`` in configs/demo.yaml, whose VAE turns the 16-px
images into 8 x 8 latents; ``@16`` is a VAE that keeps the side). Per shape and batch it times
``--steps`` training steps (forward, backward, AdamW; random 4-channel latents of the shape's side,
77 text tokens of the base's 64 channels) after one warm-up step, and one sampling forward at batch
128 (64 prompts with classifier-free guidance, as the final evaluation runs them) without gradients.
Repetitions interleave the shapes, so a drift of the machine's speed hits every shape alike; it
prints each median and its ratio to the first shape's (the demo's workers each run one thread:
``--threads 1``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memreg.testing import tiny_unet  # noqa: E402

LATENT, TOKENS, TEXT_DIM, SAMPLE_BATCH = 8, 77, 64, 128   # LATENT: the side without @


def parse_shape(text: str) -> dict:
    """``32,64,64:2[:8][@8]`` -> tiny_unet keyword arguments and ``sample_size`` (the latent side); a
    malformed shape is a ValueError naming it."""
    spec, _, side = text.partition("@")
    parts = spec.split(":")
    try:
        channels = tuple(int(c) for c in parts[0].split(","))
        levels = int(parts[1])
        head = int(parts[2]) if len(parts) > 2 else 8
        size = int(side) if side else LATENT
    except (IndexError, ValueError):
        raise ValueError(f"--shapes {text!r}: expected channels:attention_levels[:head_dim][@latent_side]") from None
    if not 1 <= levels <= len(channels):
        raise ValueError(f"--shapes {text!r}: attention levels must be 1..{len(channels)}")
    if size % 2 ** (len(channels) - 1):
        raise ValueError(f"--shapes {text!r}: the latent side must divide by {2 ** (len(channels) - 1)}")
    return {"unet_channels": channels, "attention_levels": levels, "attention_head_dim": head, "sample_size": size}


def train_step_s(unet, batch: int, steps: int) -> float:
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    side = unet.config.sample_size
    x, e = torch.randn(batch, 4, side, side), torch.randn(batch, TOKENS, TEXT_DIM)
    t = torch.randint(0, 1000, (batch,))
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        unet(x, t, e).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


@torch.no_grad()
def sample_forward_s(unet) -> float:
    side = unet.config.sample_size
    x, e = torch.randn(SAMPLE_BATCH, 4, side, side), torch.randn(SAMPLE_BATCH, TOKENS, TEXT_DIM)
    t = torch.full((SAMPLE_BATCH,), 500)
    unet(x, t, e)
    t0 = time.perf_counter()
    unet(x, t, e)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["32,64,64:2@8", "32,64,64:2@16", "32,64,64:1@8", "32,64:1@8"])
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 16])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        shapes = {s: parse_shape(s) for s in args.shapes}
    except ValueError as err:
        ap.error(str(err))   # exit 2, before any model is built
    unets = {}
    for name, kw in shapes.items():
        torch.manual_seed(0)
        unets[name] = tiny_unet(cross_attention_dim=TEXT_DIM, **kw)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.reps):
        for name, unet in unets.items():
            for b in args.batches:
                times.setdefault((name, f"train b{b}"), []).append(train_step_s(unet, b, args.steps))
            times.setdefault((name, f"sample b{SAMPLE_BATCH}"), []).append(sample_forward_s(unet))
    first = args.shapes[0]
    medians = {k: statistics.median(v) for k, v in times.items()}
    out: dict = {}
    print(f"{'shape':<16} {'params':>7}  " + "  ".join(f"{m:>20}" for m in dict.fromkeys(k[1] for k in medians)))
    for name, unet in unets.items():
        cells = []
        for (n, metric), v in medians.items():
            if n == name:
                cells.append(f"{v:8.3f}s ({medians[first, metric] / v:4.2f}x)")
                out.setdefault(name, {})[metric] = v
        print(f"{name:<16} {sum(p.numel() for p in unet.parameters()) / 1e6:6.2f}M  " + "  ".join(f"{c:>20}" for c in cells))
    print(f"(median of {args.reps} interleaved repetitions; speed-up against {first}, higher is faster)")
    return out


if __name__ == "__main__":
    main()
