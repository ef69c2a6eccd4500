#!/usr/bin/env python
"""Speed targets of the anisotropy score and of ``memreg detect``'s scoring loop, side by side.

(a) One bare UNet call on the 4B-sample batch the score needs for B prompts vs ``AnisotropyScore``
    on B prompts (the same UNet call plus input assembly and the fp32 score math).
    Target: ratio <= 1.05x (floor 1.00x: the score cannot beat the UNet call it contains).
(b) Prompts/s of detect's scoring path (``memreg.detect.score_prompts``: batched encoding, the
    empty prompt encoded once, and -- x_T being shared by all prompts of a seed, as in the
    paper -- the unconditional predictions computed once per seed, so one 2B-sample UNet call per
    batch) vs a loop in the style of the paper's released code: one prompt at a time, the prompt
    and the empty prompt re-encoded each time, two separate UNet calls ([u, c] at t_hi, then
    [u, c] at t_lo). The detect path without the uncond cache is printed for information.
    Target: >= 3x at B=16 on the tiny pipeline.

Repetitions are interleaved (A, B, A, B, ...) after warmup and medians are reported. Runs on the
tiny offline pipeline (built in a temp dir) on CPU unless --model/--device say otherwise.

    .venv/bin/python scripts/bench_score.py [--model DIR_OR_HUB_ID] [--device cuda --dtype float16]
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

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memreg.detect import score_prompts  # noqa: E402  (the function `memreg detect` runs)
from memreg.encoding import PromptEncoder  # noqa: E402
from memreg.models import load_components  # noqa: E402
from memreg.score import (AnisotropyScore, channel_alignment, guidance_norm, pure_noise_latents,  # noqa: E402
                          to_epsilon)

SHARED_PROMPTS = ROOT.parent / "shared" / "data" / "prompts"
FALLBACK_PROMPTS = ["a red car on a road", "a photo of a dog on the beach", "an old house in the snow",
                    "a blue bird on a tree", "portrait of a woman with a cup of coffee", "the moon over the sea",
                    "a poster of a rocket", "two cats on a chair near the window"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, reps: int, warmup: int, device) -> dict[str, float]:
    """Median seconds of each callable, run A, B, A, B, ... after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def load_prompts(path: str | None, n: int) -> list[str]:
    if path:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    elif (SHARED_PROMPTS / "sd1_mem.txt").is_file():
        lines = ((SHARED_PROMPTS / "sd1_mem.txt").read_text(encoding="utf-8").splitlines()
                 + (SHARED_PROMPTS / "sd1_nmem.txt").read_text(encoding="utf-8").splitlines())
    else:
        lines = FALLBACK_PROMPTS
    lines = [ln.strip() for ln in lines if ln.strip()]
    return [lines[i % len(lines)] for i in range(n)]


@torch.no_grad()
def seed_style_loop(comps, scorer: AnisotropyScore, prompts: list[str], seed: int, device) -> tuple[list, list]:
    """The released code's pattern: per prompt, encode (prompt, "") and call the UNet twice."""
    tok, te, unet = comps.tokenizer, comps.text_encoder, comps.unet
    pt = scorer.prediction_type
    norms, aligns = [], []
    for p in prompts:
        x = pure_noise_latents(unet, 1, torch.Generator().manual_seed(seed), device=device)
        ids = tok([p], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        c = te(ids.input_ids.to(device))[0]
        ids_u = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        u = te(ids_u.input_ids.to(device))[0]
        emb = torch.cat([u, c]).to(unet.dtype)
        xx = torch.cat([x, x])
        out = {}
        for name, t in (("hi", scorer.t_hi), ("lo", scorer.t_lo)):
            o = unet(xx.to(unet.dtype), t, encoder_hidden_states=emb).sample.float()
            ab = scorer.alphas_cumprod[t].float().to(device).expand(1)
            e_u, e_c = (to_epsilon(v, x, ab, pt) for v in o.chunk(2))
            out[name] = (e_u, e_c)
        e_u, e_c = out["hi"]
        norms.append(float(guidance_norm(e_c - e_u)[0]))
        e_u, e_c = out["lo"]
        aligns.append(float(channel_alignment(e_u, e_c - e_u)[0]))
    return norms, aligns


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="diffusers SD dir or hub id (default: build the tiny pipeline)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=16, help="B: prompts per scored batch")
    ap.add_argument("--n-prompts", type=int, default=64, help="prompts per (b) repetition")
    ap.add_argument("--prompts", default=None, help="prompt file for (b) (default: the shared sd1 lists)")
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions of (a)")
    ap.add_argument("--reps-b", type=int, default=3, help="timed repetitions of (b)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    tmp = None
    model = args.model
    if model is None:
        from memreg.testing import build_tiny_sd

        tmp = tempfile.TemporaryDirectory(prefix="memreg_bench_")
        model = str(build_tiny_sd(Path(tmp.name) / "tiny_sd"))
    comps = load_components(model, dtype=args.dtype, device=device, with_vae=False)
    scorer = AnisotropyScore(comps.unet, comps.scheduler, preset="sd1")
    encoder = PromptEncoder(comps.tokenizer, comps.text_encoder, device=device)
    unet = comps.unet
    B = args.batch_size
    name = "tiny pipeline" if args.model is None else args.model
    print(f"memreg bench_score: {name} | {device} {args.dtype} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | B={B} | {comps.prediction_type}")

    # (a) bare UNet call at 4B vs AnisotropyScore at B ------------------------------------------
    prompts = load_prompts(args.prompts, max(B, args.n_prompts))
    cond = encoder.encode(prompts[:B]).embeds
    uncond = encoder.uncond()
    x = pure_noise_latents(unet, B, torch.Generator().manual_seed(0), device=device)
    sample, t, emb = scorer.unet_inputs(x, cond, uncond)
    sample, emb = sample.to(unet.dtype).contiguous(), emb.to(unet.dtype).contiguous()

    @torch.no_grad()
    def bare():
        return unet(sample, t, encoder_hidden_states=emb).sample

    @torch.no_grad()
    def score():
        return scorer(x, cond, uncond).score

    med = interleaved({"bare": bare, "score": score}, args.reps, args.warmup, device)
    ratio_a = med["score"] / med["bare"]
    ok_a = ratio_a <= 1.05
    print(f"(a) bare UNet call, batch {4 * B}: {1e3 * med['bare']:9.2f} ms (median of {args.reps})")
    print(f"    AnisotropyScore, B={B}:      {1e3 * med['score']:9.2f} ms")
    print(f"    ratio score/bare = {ratio_a:.3f}x  (target <= 1.05x, floor 1.00x)  {'PASS' if ok_a else 'MISS'}")

    # (b) detect's scoring path vs a seed-style per-prompt loop -------------------------------
    ps = prompts[:args.n_prompts]
    results = {}

    def detect_path():
        results["detect"] = score_prompts(scorer, encoder, comps.scheduler, ps, seeds=[0], batch_size=B,
                                          wen_steps=1, noise="shared")

    def detect_no_share():
        results["detect_4b"] = score_prompts(scorer, encoder, comps.scheduler, ps, seeds=[0], batch_size=B,
                                             wen_steps=1, noise="shared", share_uncond=False)

    def seed_loop():
        results["seed"] = seed_style_loop(comps, scorer, ps, seed=0, device=device)

    med_b = interleaved({"detect": detect_path, "detect_4b": detect_no_share, "seed": seed_loop},
                        args.reps_b, 1, device)
    pps_detect = len(ps) / med_b["detect"]
    pps_seed = len(ps) / med_b["seed"]
    ratio_b = pps_detect / pps_seed
    ok_b = ratio_b >= 3.0
    d = results["detect"]
    norms, aligns = results["seed"]
    dn = max(abs(a - b) for a, b in zip(d.norm, norms))
    da = max(abs(a - b) for a, b in zip(d.align, aligns))
    print(f"(b) detect scoring path (memreg.detect.score_prompts, B={B}, {len(ps)} prompts, 1 seed, Wen included): "
          f"{pps_detect:8.1f} prompts/s (median of {args.reps_b})")
    print(f"    seed-style loop (1 prompt/call, re-encode, 2 UNet calls):                        "
          f"{pps_seed:8.1f} prompts/s")
    pps_4b = len(ps) / med_b["detect_4b"]
    print(f"    [info] detect path without the shared-uncond cache (4B-sample AnisotropyScore calls):    "
          f"{pps_4b:8.1f} prompts/s ({pps_4b / pps_seed:.2f}x)")
    print(f"    speedup = {ratio_b:.2f}x  (target >= 3x)  {'PASS' if ok_b else 'MISS'}")
    print(f"    same scores: max |d norm| = {dn:.2e}, max |d align| = {da:.2e}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
