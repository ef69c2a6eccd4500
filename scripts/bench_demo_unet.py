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

Then, on the first shape, two choices the trainer and the demo make, each timed against the other
in the same interleaved repetitions: a training step with torch's default AdamW (a loop over the
tensors on CPU) against its fused kernel (what ``memreg.training.loop`` uses), and a sampling
forward through the demo's rank-32 LoRA adapters (``configs/demo.yaml``'s modules) against the
plain layers a LoRA is merged into for inference (``memreg.generation.load_lora_fused``: the same
compute as the UNet without adapters).
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


LORA_MODULES = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2"]


def train_step_s(unet, batch: int, steps: int, fused: bool | None = None) -> float:
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused)
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
    out["parts"] = parts(shapes[first], args.batches[0], args)
    return out


def parts(kw: dict, batch: int, args) -> dict:
    """The AdamW and LoRA comparisons of the module doc, on shape ``kw``."""
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = tiny_unet(cross_attention_dim=TEXT_DIM, **kw)
    torch.manual_seed(0)
    adapted = tiny_unet(cross_attention_dim=TEXT_DIM, **kw)
    adapted.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian", target_modules=LORA_MODULES))
    times: dict[str, list[float]] = {}
    for _ in range(args.reps):
        times.setdefault("per_tensor", []).append(train_step_s(unet, batch, args.steps))
        times.setdefault("fused", []).append(train_step_s(unet, batch, args.steps, fused=True))
        times.setdefault("adapters", []).append(sample_forward_s(adapted))
        times.setdefault("merged", []).append(sample_forward_s(unet))
    m = {k: statistics.median(v) for k, v in times.items()}
    print(f"training step b{batch}, AdamW per tensor {m['per_tensor']:.3f}s, fused {m['fused']:.3f}s "
          f"({m['per_tensor'] / m['fused']:.2f}x)")
    print(f"sampling forward b{SAMPLE_BATCH}, rank-32 LoRA adapters {m['adapters']:.3f}s, merged {m['merged']:.3f}s "
          f"({m['adapters'] / m['merged']:.2f}x)")
    return m


if __name__ == "__main__":
    main()
