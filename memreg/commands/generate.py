"""``memreg generate``: generate images from a prompt file, mitigating memorized prompts first.

Writes to ``--out`` (which must be new or empty): ``images/NNNNN.png`` (one per prompt and seed),
``mitigation.jsonl`` (per image: prompt, seed, image, flagged, score before/after, steps,
seconds), ``contact_sheet.png`` (the first ``SHEET_MAX`` images, labelled) and ``settings.json``.
Every flag and input file is checked before any weights load. Library: :mod:`memreg.mitigate`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from memreg.argtypes import finite_float
from memreg.commands.common import (CommandError, add_runtime_arguments, add_sampling_arguments, check_out_empty,
                                    device_and_dtype, read_prompt_file, resolve_weights, versions)
from memreg.generation import build_pipeline
from memreg.mitigate import MODES, MitigationConfig, calibrate_config, generate_mitigated
from memreg.models import check_model_path, load_components

RECORDS_FILE, SHEET_FILE, SETTINGS_FILE, IMAGE_DIR = "mitigation.jsonl", "contact_sheet.png", "settings.json", "images"
SHEET_MAX, SHEET_CELL = 64, 96


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Generate one image per prompt and seed; with --mitigate score (default) or wen, prompts whose "
                     "memorization criterion exceeds tau get their embedding adapted first.")
    p.add_argument("--model", required=True, help="diffusers SD1.x/2.x pipeline dir or hub id")
    p.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl with 'caption'")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--mitigate", choices=MODES, default="score", help="score (memreg), wen (Wen et al. ICLR'24) or none")
    p.add_argument("--tau", type=finite_float, default=None, help="threshold (score) or target loss (wen) that flags a prompt")
    p.add_argument("--target", type=finite_float, default=None,
                   help="with --tau: score where a flagged prompt's descent stops (default: tau)")
    p.add_argument("--calibrate", default=None,
                   help="ordinary (non-memorized) prompts: tau = their --tau-quantile, target = their "
                        "--target-quantile (instead of --tau/--target)")
    p.add_argument("--tau-quantile", type=finite_float, default=0.98, help="quantile for tau with --calibrate (default 0.98)")
    p.add_argument("--target-quantile", type=finite_float, default=0.25,
                   help="quantile for the stop target with --calibrate and --mitigate score (default 0.25; "
                        "wen stops at its tau, as published)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images (seeds) per prompt")
    add_sampling_arguments(p, "--steps", seed_help="first seed; image j of prompt i uses SEED + i*N + j")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimisation step budget per prompt (default: 20 for score, 10 for wen as published)")
    p.add_argument("--lr", type=finite_float, default=None,
                   help="AdamW learning rate on the embedding (default: 0.1 for score, 0.05 for wen as published)")
    p.add_argument("--stop-streak", type=int, default=None,
                   help="evaluations in a row at or below the target before a prompt stops (default: 2 for score, "
                        "whose draws are fresh each step; 1 for wen, as published)")
    p.add_argument("--draws", type=int, default=4, help="pure-noise draws per prompt and step (score)")
    p.add_argument("--freeze-padding", action="store_true", help="move only the prompt's tokens and EOS, not padding")
    p.add_argument("--preset", choices=["sd1", "sd2"], default=None, help="score weights (default: sd2 for v-prediction models, else sd1; or --g1/--g2)")
    p.add_argument("--g1", type=finite_float, default=None, help="weight of the norm term")
    p.add_argument("--g2", type=finite_float, default=None, help="weight of the alignment term")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    add_runtime_arguments(p)


def validate(args) -> None:
    for name in ("images_per_prompt", "steps", "batch_size", "draws"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if (args.max_steps is not None and args.max_steps < 0) or (args.lr is not None and not args.lr > 0):
        raise CommandError(f"need --max-steps >= 0 and --lr > 0, got {args.max_steps} and {args.lr}")
    if args.stop_streak is not None and args.stop_streak < 1:
        raise CommandError(f"--stop-streak must be >= 1, got {args.stop_streak}")
    if args.guidance_scale < 0:
        raise CommandError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    if not 0 <= args.target_quantile <= args.tau_quantile <= 1:
        raise CommandError(f"need 0 <= --target-quantile <= --tau-quantile <= 1, got {args.target_quantile} and "
                           f"{args.tau_quantile}")
    if args.target is not None and (args.tau is None or args.target > args.tau):
        raise CommandError(f"--target needs --tau and must be <= it, got --target {args.target} --tau {args.tau}")
    if args.mitigate == "none" and (args.tau is not None or args.calibrate is not None):
        raise CommandError("--mitigate none takes neither --tau nor --calibrate")
    if args.mitigate != "none" and (args.tau is None) == (args.calibrate is None):
        raise CommandError(f"--mitigate {args.mitigate} needs exactly one of --tau or --calibrate FILE")


def run(args: argparse.Namespace) -> int:
    """The whole ``memreg generate`` run: every check before any weights load, then generation."""
    validate(args)
    given = (args.preset, args.g1, args.g2) != (None, None, None)
    # None: the model's paper preset (sd2 for v-prediction, else sd1), chosen by the library
    preset, g1, g2 = resolve_weights(args.preset, args.g1, args.g2) if given else (None, None, None)
    prompts = read_prompt_file(args.prompts, "--prompts").prompts
    ordinary = read_prompt_file(args.calibrate, "--calibrate").prompts if args.calibrate else None
    out = Path(args.out)
    check_out_empty(out)
    check_model_path(args.model)
    device, dtype = device_and_dtype(args.device, args.dtype)
    comps = load_components(args.model, revision=args.revision, variant=args.variant, dtype=dtype, device=device)
    pipe = build_pipeline(comps)
    # check(): the mode's descent defaults filled in, so settings.json records the values used
    config = MitigationConfig(mode=args.mitigate, tau=args.tau, target=args.target, max_steps=args.max_steps,
                              lr=args.lr, stop_streak=args.stop_streak, draws=args.draws, g1=g1, g2=g2,
                              num_inference_steps=args.steps,
                              move_padding=not args.freeze_padding).check()
    if ordinary is not None:
        calibrate_config(pipe, ordinary, config, args.tau_quantile, args.target_quantile, batch_size=args.batch_size)
    n = args.images_per_prompt
    rows = [(p, args.seed + i * n + j) for i, p in enumerate(prompts) for j in range(n)]

    t0 = time.perf_counter()
    with tqdm(total=len(rows), unit="image", desc="memreg generate", file=sys.stderr, disable=args.no_progress) as bar:
        res = generate_mitigated(comps, [r[0] for r in rows], [r[1] for r in rows], args.mitigate, config, pipe=pipe,
                                 guidance_scale=args.guidance_scale, batch_size=args.batch_size, progress=bar)
    settings = {"command": "generate", "model": args.model, "prompts": args.prompts, "calibrate": args.calibrate,
                "tau_quantile": args.tau_quantile if args.calibrate else None,
                "target_quantile": args.target_quantile if args.calibrate and args.mitigate == "score" else None,
                "preset": preset,
                "config": vars(config), "guidance_scale": args.guidance_scale, "images": len(rows),
                "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "timing": {"total_s": time.perf_counter() - t0, "mitigation_s": res.mitigation_seconds,
                           "generation_s": res.generation_seconds},
                "versions": versions()}
    write_outputs(out, res, settings)
    flagged = sum(r.flagged for r in res.records)
    print(f"{len(rows)} images, {flagged} flagged and adapted ({args.mitigate}, tau={config.tau}, target={config.target}); "
          f"mitigation {res.mitigation_seconds:.1f}s, generation {res.generation_seconds:.1f}s; wrote {out}")
    return 0


def write_outputs(out: Path, res, settings: dict) -> None:
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    with (out / RECORDS_FILE).open("w", encoding="utf-8") as f:
        for i, (im, rec) in enumerate(zip(res.images, res.records)):
            name = f"{IMAGE_DIR}/{i:05d}.png"
            im.save(out / name)
            f.write(json.dumps({"image": name, **rec.to_dict()}, ensure_ascii=False) + "\n")
    contact_sheet(res.images[:SHEET_MAX], res.records[:SHEET_MAX]).save(out / SHEET_FILE)
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, default=str) + "\n", encoding="utf-8")


def contact_sheet(images, records, cell: int = SHEET_CELL, columns: int = 8):
    """A PIL grid of the images, each labelled with its index and, if flagged (red), its criterion
    before -> after and steps."""
    font = ImageFont.load_default()
    cols = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // cols))
    pad, text_h = 4, 26
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (im, rec) in enumerate(zip(images, records)):
        x, y = pad + (k % cols) * (cell + pad), pad + (k // cols) * (cell + text_h + pad)
        resample = Image.Resampling.NEAREST if max(im.size) < cell else Image.Resampling.BICUBIC
        sheet.paste(im.convert("RGB").resize((cell, cell), resample), (x, y))
        draw.text((x, y + cell + 1), f"#{k} seed {rec.seed}", fill=(0, 0, 0), font=font)
        if rec.flagged:
            label = f"{rec.score_before:.2f}>{rec.score_after:.2f} {rec.steps}st"
            draw.text((x, y + cell + 13), label, fill=(200, 0, 0), font=font)
    return sheet
