"""``memreg attack --model M --data D --control C --out DIR``: can the training images be got out?

Every input is checked before any weights load (:mod:`memreg.attack.inputs`); a mistake prints
``memreg attack: error: <file>:<row>: <cause>`` (or ``--flag: <cause>``) and exits with 2. Runs as
one process or sharded under ``accelerate launch -m memreg.cli attack ...`` (:mod:`memreg.sharding`):
the targets -- trained and control alternating -- are cut into shards of ``--shard-size``, each
process attacks its shards and writes ``parts/shard-NNNNN.jsonl`` and the best reproductions under
``images/``, and the main process writes ``attack.json`` and ``attack.html``. Run the same command
again after a crash or a spent ``--time-budget`` and the finished shards are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from memreg.argtypes import finite_float
from memreg.attack.api import check_lora, load_pipeline
from memreg.attack.inputs import AttackInputError, read_clusters, read_imagefolder
from memreg.attack.outputs import (IMAGES_DIR, build_report, format_table, image_paths, save_image, write_html,
                                   write_json)
from memreg.attack.runner import ATTACKS, AttackSettings, Attacker
from memreg.attack.targets import group_images, interleave, select_control, select_trained
from memreg.commands.common import add_sampling_arguments
from memreg.copy_detect import build_copy_detector
from memreg.models import check_model_path
from memreg.sharding import (PARTS_DIR, apply_plan, part_path, plan_out, process_state, read_part,
                             run_shards, shard_ranges)

OUTPUT_FILES = ("attack.json", "attack.html")
_POSITIVE_INTS = ("max_targets", "max_wordings", "draws", "steps", "fit_noises", "noise_seeds",
                  "num_inference_steps", "batch_size", "shard_size")


class BudgetSpent(Exception):
    """``--time-budget`` is spent: no new shard starts."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers pipeline dir, SD 1.x/2.x or SDXL (with --lora: the base it was trained on)")
    p.add_argument("--lora", default=None, help="LoRA output dir (pytorch_lora_weights.safetensors) on top of --model")
    p.add_argument("--data", required=True, help="the training imagefolder (metadata.jsonl)")
    p.add_argument("--control", required=True, help="imagefolder of held-out images of the same kind, never trained on")
    p.add_argument("--clusters", default=None, help="clusters.jsonl of `memreg audit` (default: exact pixel duplicates)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--allow-external-files", action="store_true", help="let metadata.jsonl name files outside "
                   "its folder (refused by default, as in training)")
    p.add_argument("--max-targets", type=int, default=64, help="trained targets: every duplicated image, then a "
                   "sample of the rest, this many in all")
    p.add_argument("--max-control", type=int, default=None, help="control targets (default: as many as trained)")
    p.add_argument("--max-wordings", type=int, default=8, help="training wordings tried per target")
    p.add_argument("--attacks", default="prompts,perturbed,embedding",
                   help=f"comma-separated, in order of strength: {','.join(ATTACKS)}")
    p.add_argument("--draws", type=int, default=4, help="generations per wording and per fitted embedding")
    p.add_argument("--perturbed", type=int, default=4, help="edited wordings per target")
    p.add_argument("--steps", type=int, default=50, help="Adam steps of the embedding search, per start")
    p.add_argument("--lr", type=finite_float, default=0.01, help="Adam learning rate of the embedding search")
    p.add_argument("--fit-noises", type=int, default=4, help="(timestep, noise) pairs per search step")
    p.add_argument("--noise-seeds", type=int, default=16, help="initial noises tried by the 'noise' attack")
    add_sampling_arguments(p, "--num-inference-steps", seed_help="seed of the target sample and of every generation")
    p.add_argument("--batch-size", type=int, default=8, help="generations per pipeline call")
    p.add_argument("--exhaustive", action="store_true", help="run every attack on every target (default: stop "
                   "at the first that extracts it)")
    p.add_argument("--time-budget", type=finite_float, default=None, help="seconds; no new shard starts after it "
                   "(run again to continue)")
    p.add_argument("--copy-detector", default="ssim", help="ssim | sscd")
    p.add_argument("--sscd-path", default=None, help="SSCD TorchScript file (with --copy-detector sscd)")
    p.add_argument("--copy-threshold", type=finite_float, default=None, help="default: the detector's calibrated one")
    p.add_argument("--shard-size", type=int, default=4, help="targets per shard (the unit of resume)")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace a finished attack in --out")
    p.add_argument("--no-progress", action="store_true")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(args) -> list[str]:
    """Check every numeric flag (finite, in range); returns the attacks in order of strength."""
    for name in _POSITIVE_INTS + ("max_control",):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise AttackInputError(f"{_flag(name)}: must be >= 1, got {v}")
    if args.perturbed < 0:
        raise AttackInputError(f"--perturbed: must be >= 0, got {args.perturbed}")
    for name, ok, rule in (("lr", lambda v: v > 0, "> 0"), ("guidance_scale", lambda v: v >= 0, ">= 0"),
                           ("time_budget", lambda v: v > 0, "> 0"), ("copy_threshold", lambda v: True, "")):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and ok(v)):
            raise AttackInputError(f"{_flag(name)}: must be finite{' and ' + rule if rule else ''}, got {v}")
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = [a for a in names if a not in ATTACKS]
    if bad or not names:
        raise AttackInputError(f"--attacks: unknown attack(s) {bad or names}; choose from {list(ATTACKS)}")
    return [a for a in ATTACKS if a in names]


def settings_of(args, attacks: list[str]) -> AttackSettings:
    return AttackSettings(attacks=tuple(attacks), draws=args.draws, perturbed=args.perturbed, steps=args.steps,
                          lr=args.lr, fit_noises=args.fit_noises, noise_seeds=args.noise_seeds,
                          num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                          batch_size=args.batch_size, stop_at_success=not args.exhaustive, seed=args.seed)


def prepare_targets(args) -> list:
    """Trained and control targets, alternating; every input error surfaces here."""
    clusters = read_clusters(args.clusters) if args.clusters else None
    train_rows = read_imagefolder(args.data, args.caption_column, "--data", args.allow_external_files)
    control_rows = read_imagefolder(args.control, args.caption_column, "--control", args.allow_external_files)
    groups = group_images(args.data, train_rows)
    trained = select_trained(args.data, groups, args.max_targets, args.max_wordings, args.seed, clusters,
                             args.clusters)
    cgroups = group_images(args.control, control_rows)
    control = select_control(args.control, cgroups, set(groups), args.max_control or len(trained),
                             args.max_wordings, args.seed)
    return interleave(trained, control)


def _resolved(p: str | None) -> str | None:
    return None if p is None else str(Path(p).resolve())


def fingerprint(args, settings: AttackSettings, items: list, detector) -> dict:
    """What a shard's records depend on; finished shards are reused only under the same."""
    return {"model": _resolved(args.model), "lora": _resolved(args.lora), "data": _resolved(args.data),
            "control": _resolved(args.control), "clusters": _resolved(args.clusters), "dtype": args.dtype,
            "caption_column": args.caption_column, "settings": settings.to_dict(), "shard_size": args.shard_size,
            "detector": {"name": detector.name, "threshold": float(detector.threshold), "sscd": args.sscd_path},
            "targets": [[t.id, t.file_name, t.wordings] for t in items]}


def _finished_outputs(out: Path) -> tuple[str, ...]:
    """The output files that count as a finished run (an incomplete attack.json does not)."""
    f = out / "attack.json"
    if f.is_file():
        try:
            if not json.loads(f.read_text(encoding="utf-8")).get("complete", True):
                return ()
        except ValueError:
            pass
    return OUTPUT_FILES


def _shard_work(args, settings, items, detector, out: Path, deadline: float, bar):
    """``make_work`` for :func:`memreg.sharding.run_shards`: loads the model once, then attacks shards."""
    def make_work():
        attacker = Attacker(load_pipeline(args.model, args.lora, process_state().device, args.dtype), detector,
                            settings)

        def work(start: int, stop: int):
            if time.perf_counter() > deadline:
                raise BudgetSpent
            t0, records = time.perf_counter(), []
            for t in items[start:stop]:
                rec, best = attacker.attack(t)
                target_png, best_png = image_paths(out, t.id)
                save_image(t.image, target_png)
                if best is not None:
                    save_image(best, best_png)
                records.append(rec)
                bar.update(1)
            return {"seconds": time.perf_counter() - t0}, records
        return work
    return make_work


def collect(out: Path, n_items: int, shard_size: int) -> tuple[list[dict], bool]:
    """Every finished shard's records in target order, and whether all shards are finished."""
    records, complete = [], True
    for k in range(len(shard_ranges(n_items, shard_size))):
        if part_path(out / PARTS_DIR, k).exists():
            records += list(read_part(out / PARTS_DIR, k)[1])
        else:
            complete = False
    return records, complete


def run(args: argparse.Namespace) -> int:
    """The whole command on this process; the main process writes attack.json and attack.html."""
    t_start = time.perf_counter()
    state = process_state()
    settings = settings_of(args, validate(args))
    check_model_path(args.model)
    check_lora(args.lora)
    detector = build_copy_detector(args.copy_detector, threshold=args.copy_threshold, sscd_path=args.sscd_path)
    items = prepare_targets(args)
    out = Path(args.out)
    fp = fingerprint(args, settings, items, detector)
    action = plan_out(out, fp, args.overwrite, _finished_outputs(out), "an attack")
    if state.is_main_process:
        apply_plan(out, fp, action)
        (out / IMAGES_DIR).mkdir(exist_ok=True)
    state.wait_for_everyone()
    deadline = t_start + (args.time_budget if args.time_budget is not None else math.inf)
    with tqdm(total=len(items), unit="target", desc="memreg attack", file=sys.stderr,
              disable=args.no_progress or not state.is_main_process) as bar:
        try:
            run_shards(out / PARTS_DIR, len(items), args.shard_size, state.process_index, state.num_processes,
                       _shard_work(args, settings, items, detector, out, deadline, bar))
        except BudgetSpent:
            print(f"memreg attack: process {state.process_index}: --time-budget {args.time_budget:g}s spent",
                  file=sys.stderr)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    records, complete = collect(out, len(items), args.shard_size)
    meta = {"model": args.model, "lora": args.lora, "data": args.data, "control": args.control,
            "clusters": args.clusters, "settings": settings.to_dict(),
            "detector": {"name": detector.name, "threshold": float(detector.threshold)},
            "wall_s": time.perf_counter() - t_start}
    report = build_report(records, meta, complete)
    write_json(out / "attack.json", report)
    write_html(out / "attack.html", report)
    print(format_table(report))
    done = f"{len(records)} of {len(items)} targets attacked" + ("" if complete else
                                                                 "; run the same command again to continue")
    print(f"memreg attack: {done}; wrote {out / 'attack.json'}, {out / 'attack.html'}")
    return 0
