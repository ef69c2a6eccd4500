#!/usr/bin/env python
"""Cost of ``memreg attack``: seconds per target per attack, and the ratio to one plain generation.

On the tiny offline pipeline (the demo's shape: 16-px images, a VAE that halves the side to 8 x 8
latents, UNet levels 32/64/64, two with cross-attention, 64-d text; random weights, which cost the
same as trained ones) or ``--model``. Each repetition times one plain generation (one prompt, one
seed, the attack's DDIM steps and guidance) and then one target under every attack
(``stop_at_success`` off, so each attack runs), interleaved (gen, attack, gen, attack, ...) after a
warm-up, so both see the same machine state; medians are reported. Only ratios measured in the same
run compare.

    .venv/bin/python scripts/bench_attack.py [--reps 5] [--threads 1] [--steps 20 --draws 2 ...] [--model DIR]

Defaults are the demo's attack budget (configs/demo.yaml, attack:).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from memreg.attack import ATTACKS, AttackSettings, Attacker, Target, load_pipeline  # noqa: E402
from memreg.copy_detect import build_copy_detector  # noqa: E402
from memreg.generation import generate_images  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers pipeline dir (default: a tiny one, built here)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--perturbed", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fit-noises", type=int, default=4)
    p.add_argument("--noise-seeds", type=int, default=16)
    p.add_argument("--num-inference-steps", type=int, default=10)
    return p.parse_args(argv)


def tiny_model(root: Path) -> str:
    from memreg.testing import build_tiny_sd

    return str(build_tiny_sd(root / "tiny", sample_size=8, unet_channels=(32, 64, 64), attention_levels=2,
                             cross_attention_dim=64, vae_downsample=True))


def bench(pipe, settings: AttackSettings, reps: int) -> dict:
    """Median seconds of one plain generation and of each attack on one target."""
    attacker = Attacker(pipe, build_copy_detector("ssim"), settings)
    target = Target("trained-00000", "trained", Image.new("RGB", (16, 16), (200, 40, 40)),
                    ["a red circle and a white cross"], 2, "t.png")
    gen = lambda seed: generate_images(None, [target.wordings[0]], [seed], pipe=pipe,  # noqa: E731
                                       num_inference_steps=settings.num_inference_steps,
                                       guidance_scale=settings.guidance_scale)
    gen(0)
    attacker.attack(target)                      # warm-up
    plain, per_attack = [], {a: [] for a in settings.attacks}
    for r in range(reps):
        t0 = time.perf_counter()
        gen(r + 1)
        plain.append(time.perf_counter() - t0)
        record, _ = attacker.attack(target)
        for a in settings.attacks:
            per_attack[a].append(record["attacks"][a]["seconds"])
    gens = {a: record["attacks"][a]["generations"] for a in settings.attacks}
    return {"plain": statistics.median(plain), "attacks": {a: statistics.median(v) for a, v in per_attack.items()},
            "generations": gens, "adam_steps": {a: record["attacks"][a]["steps"] for a in settings.attacks}}


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = AttackSettings(attacks=ATTACKS, draws=args.draws, perturbed=args.perturbed, steps=args.steps,
                              fit_noises=args.fit_noises, noise_seeds=args.noise_seeds,
                              num_inference_steps=args.num_inference_steps, stop_at_success=False)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = load_pipeline(args.model or tiny_model(Path(tmp)))
        res = bench(pipe, settings, args.reps)
    print(f"memreg attack cost, {args.reps} interleaved reps, {torch.get_num_threads()} torch thread(s); "
          f"draws {args.draws}, perturbed {args.perturbed}, steps {args.steps} x 2 starts, fit noises "
          f"{args.fit_noises}, noise seeds {args.noise_seeds}, DDIM {args.num_inference_steps}")
    print(f"one plain generation: {res['plain'] * 1000:.1f} ms (1.00x)")
    print(f"{'attack':10s}  {'s/target':>9s}  {'x one generation':>16s}  {'generations':>11s}  {'Adam steps':>10s}")
    total = 0.0
    for a, s in res["attacks"].items():
        total += s
        print(f"{a:10s}  {s:>9.3f}  {s / res['plain']:>15.1f}x  {res['generations'][a]:>11d}  "
              f"{res['adam_steps'][a]:>10d}")
    print(f"{'all':10s}  {total:>9.3f}  {total / res['plain']:>15.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
