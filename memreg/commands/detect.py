"""``memreg detect``: score memorized vs non-memorized prompt lists and report detection metrics.

The command checks every flag and input file before any weights load, then wires the library
(:mod:`memreg.detect`: scoring, weight fitting, report and output files) and prints the table.

Scale out: under ``accelerate launch -m memreg.cli detect ...`` (or with ``--shard-size`` on one
process) the prompt list is cut into shards of ``--shard-size`` prompts (a multiple of
``--batch-size``, so the batches, hence the float results, are the same as one process's), each
process scores its shards into ``--out/parts/`` (:mod:`memreg.sharding`: atomic parts, finished
shards skipped on a rerun) and the main process merges them and writes the usual outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from memreg.argtypes import finite_float
from memreg.commands.common import (add_runtime_arguments, check_out_keeps, device_and_dtype, read_prompt_file,
                                    resolve_weights, versions)
from memreg.detect import (MEM_LABEL, NONMEM_LABEL, OUTPUT_FILES, DETECT_TERMS, DetectError, ScoredPrompts, build_report,
                           fit_weights, format_table, merge_parts, score_prompts, write_outputs)
from memreg.families import family_of, prompt_encoder
from memreg.metrics import detection_metrics
from memreg.models import check_model_path, load_components
from memreg.score import NOISE_MODES, PRESETS, SPACES, AnisotropyScore
from memreg.sharding import PARTS_DIR, apply_plan, plan_out, process_state, run_shards

SHARD_BATCHES = 16  # default --shard-size under accelerate launch, in batches


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Score memorized and non-memorized prompt lists with the anisotropy score "
                     "(norm + alignment) and Wen et al.'s norm; write scores.jsonl, report.json and "
                     "roc.png to --out.")
    p.add_argument("--model", required=True, help="diffusers SD1.x/2.x pipeline dir or hub id")
    p.add_argument("--mem", required=True, help="memorized prompts (label 1): .txt or .jsonl with 'caption'")
    p.add_argument("--nonmem", required=True, help="non-memorized prompts (label 0): .txt or .jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--seeds", type=int, default=1, help="noise draws per prompt (seeds SEED..SEED+N-1)")
    p.add_argument("--seed", type=int, default=0, help="first noise seed (default 0)")
    p.add_argument("--noise", choices=NOISE_MODES, default="shared",
                   help="shared: one x_T per seed for all prompts (paper); per-prompt: x_T seeded by (seed, prompt)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per UNet call (the call has 4x samples)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper weights: sd1 (g1=1, g2=2) or sd2 (g1=1, g2=0.1); default sd1 unless --g1/--g2")
    p.add_argument("--g1", type=finite_float, default=None, help="weight of the norm term (instead of --preset)")
    p.add_argument("--g2", type=finite_float, default=None, help="weight of the alignment term (instead of --preset)")
    p.add_argument("--t-hi", type=int, default=None, help="norm timestep (default: first of 50 DDIM steps, 981 for SD)")
    p.add_argument("--t-lo", type=int, default=None, help="alignment timestep (default: third-to-last, 41 for SD)")
    p.add_argument("--space", choices=SPACES, default="eps",
                   help="norm on eps (paper definition) or score space (paper's released SD2 code)")
    p.add_argument("--wen-steps", type=int, default=1, help="DDIM steps of Wen et al.'s norm (1 = single step)")
    p.add_argument("--fit-weights", action="store_true",
                   help="also fit g1/g2 by cross-validated logistic regression on [norm, align]")
    p.add_argument("--cv-folds", type=int, default=5, help="folds for --fit-weights (capped by class counts)")
    add_runtime_arguments(p)
    p.add_argument("--shard-size", type=int, default=None,
                   help="prompts per shard (a multiple of --batch-size): score in resumable parts under "
                        "--out/parts, split across `accelerate launch` processes (default there: 16 batches)")


def validate(args) -> None:
    for name in ("seeds", "batch_size", "cv_folds"):
        if getattr(args, name) < 1:
            raise DetectError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.fit_weights and args.cv_folds < 2:
        raise DetectError(f"--cv-folds must be >= 2 with --fit-weights, got {args.cv_folds}")
    if args.shard_size is not None and (args.shard_size < 1 or args.shard_size % args.batch_size):
        raise DetectError(f"--shard-size must be a positive multiple of --batch-size {args.batch_size} (so the "
                          f"batches do not depend on the process count), got {args.shard_size}")
    if not 1 <= args.wen_steps <= 50:
        raise DetectError(f"--wen-steps must be in [1, 50], got {args.wen_steps}")


def check_timesteps(args) -> None:
    """Range-check --t-hi/--t-lo against the scheduler config (a small JSON) before loading weights."""
    if args.t_hi is None and args.t_lo is None:
        return
    try:
        cfg = DDPMScheduler.load_config(args.model, subfolder="scheduler", revision=args.revision)
    except OSError:
        return  # load_components reports it
    n_train = int(cfg.get("num_train_timesteps", 1000))
    for flag, t in (("--t-hi", args.t_hi), ("--t-lo", args.t_lo)):
        if t is not None and not 0 <= t < n_train:
            raise DetectError(f"{flag} {t} is outside the scheduler's [0, {n_train}) timesteps")


def run(args: argparse.Namespace) -> int:
    """The whole ``memreg detect`` run. Cheap checks first (flags, prompt files, output dir, model
    dir), all before loading any weights."""
    validate(args)
    preset, g1, g2 = resolve_weights(args.preset, args.g1, args.g2)
    mem = read_prompt_file(args.mem, "--mem")
    nonmem = read_prompt_file(args.nonmem, "--nonmem")
    out = Path(args.out)
    state = process_state() if args.shard_size is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    fp = None if state is None else fingerprint(args, mem.prompts, nonmem.prompts, preset)
    if state is None:
        check_out_keeps(out, OUTPUT_FILES, args.overwrite)
    else:
        action = plan_out(out, fp, args.overwrite, OUTPUT_FILES, "a detect run")
    check_model_path(args.model, ("unet", "text_encoder", "tokenizer", "scheduler"))
    device, dtype = device_and_dtype(args.device, args.dtype, None if state is None else str(state.device))
    check_timesteps(args)

    t0 = time.perf_counter()
    comps = load_components(args.model, revision=args.revision, variant=args.variant, dtype=dtype,
                            device=device, with_vae=False)
    load_s = time.perf_counter() - t0
    try:
        scorer = AnisotropyScore(comps.unet, comps.scheduler, t_hi=args.t_hi, t_lo=args.t_lo,
                                 g1=g1, g2=g2, space=args.space)
    except ValueError as e:
        raise DetectError(str(e)) from None
    encoder = prompt_encoder(comps, device=device)
    seeds = list(range(args.seed, args.seed + args.seeds))

    prompts = mem.prompts + nonmem.prompts
    labels = np.array([MEM_LABEL] * len(mem.prompts) + [NONMEM_LABEL] * len(nonmem.prompts))

    def score(batch: list[str], show: bool = True) -> ScoredPrompts:
        with tqdm(total=len(batch) * len(seeds), unit="prompt", desc="memreg detect", file=sys.stderr,
                  disable=args.no_progress or not show, dynamic_ncols=True) as bar:
            return score_prompts(scorer, encoder, comps.scheduler, batch, seeds=seeds, batch_size=args.batch_size,
                                 wen_steps=args.wen_steps, noise=args.noise, progress=bar)
    if state is None:
        res = score(prompts)
    else:
        if state.is_main_process:
            apply_plan(out, fp, action)
        state.wait_for_everyone()
        res = score_sharded(args, state, out / PARTS_DIR, prompts, score)
        if res is None:
            return 0  # not the main process: its parts are written, the main process merges them

    for t in DETECT_TERMS:
        bad = np.flatnonzero(~np.isfinite(res.term(t)))
        if bad.size:
            raise DetectError(f"{bad.size} prompt(s) got a non-finite {t} (first: {prompts[bad[0]]!r}); "
                              f"with --dtype {args.dtype or dtype} try bfloat16 or float32")
    metrics = {t: detection_metrics(labels, res.term(t)).to_dict() for t in DETECT_TERMS}
    fitted = None
    if args.fit_weights:
        fitted = fit_weights(res.norm, res.align, labels, folds=args.cv_folds)
    report = build_report(args, mem, nonmem, res, scorer, encoder, metrics, fitted, preset, seeds, dtype, device,
                          load_s, versions())
    family = family_of(comps)
    report["model_family"] = {"name": family.name, "label": family.label,
                              "score_weights_validated": family.preset_validated, "note": family.preset_note or None}
    if state is not None:
        report["settings"]["shard_size"] = shard_size(args)
        report["timing"]["processes"] = state.num_processes

    write_outputs(out, prompts, labels, res, fitted, report, args.model)
    print(format_table(report))
    if not family.preset_validated:
        print(f"note: {family.preset_note}")
    print(f"wrote {out / 'scores.jsonl'}, {out / 'report.json'}, {out / 'roc.png'}")
    return 0


# --------------------------------------------------------------------------------------------
# Sharded scoring: accelerate processes (or one, resumable), parts merged by the main process
# --------------------------------------------------------------------------------------------

def shard_size(args) -> int:
    return args.shard_size or SHARD_BATCHES * args.batch_size


def fingerprint(args, mem: list[str], nonmem: list[str], preset: str | None) -> dict:
    """The settings a part's numbers depend on; finished parts are reused only under the same."""
    digest = hashlib.sha256(json.dumps([mem, nonmem], ensure_ascii=False).encode("utf-8")).hexdigest()
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    keys = ("revision", "variant", "seeds", "seed", "noise", "batch_size", "g1", "g2", "t_hi", "t_lo",
            "space", "wen_steps", "dtype", "device")
    return {"model": model, "prompts_sha256": digest, "prompts": len(mem) + len(nonmem), "preset": preset,
            "shard_size": shard_size(args), **{k: getattr(args, k) for k in keys}}


def score_sharded(args, state, parts: Path, prompts: list[str], score) -> ScoredPrompts | None:
    """Score this process's unfinished shards of ``prompts`` with ``score(batch, show)`` into
    ``parts``; the main process returns the merged :class:`ScoredPrompts`, the others None."""
    size = shard_size(args)

    def make_work():
        def work(start: int, stop: int):
            res = score(prompts[start:stop], state.is_local_main_process)
            items = [{"i": start + k, "norm": float(res.norm[k]), "align": float(res.align[k]),
                      "score": float(res.score[k]), "wen": None if res.wen is None else float(res.wen[k]),
                      "truncated": bool(res.truncated[k])} for k in range(stop - start)]
            return {"score_s": res.seconds, "wen_reused_norm": res.wen_reused_norm}, items
        return work

    t0 = time.perf_counter()
    done = run_shards(parts, len(prompts), size, state.process_index, state.num_processes, make_work)
    print(f"memreg detect: process {state.process_index}/{state.num_processes}: {len(done['done'])} shard(s) "
          f"scored, {len(done['skipped'])} already finished, {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    state.wait_for_everyone()
    return merge_parts(parts, len(prompts), size) if state.is_main_process else None
