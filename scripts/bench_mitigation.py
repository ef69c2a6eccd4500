#!/usr/bin/env python
"""Inference-time mitigation under several descent settings, on a saved demo run's model.

Reads a finished demo's ``results.json`` (its base model, data and ``mitigation:`` settings), loads
the run's model (default ``none``) and measures, exactly as ``make demo`` does
(``memreg.demo.mitigation.evaluate_mitigation``: the same prompts, seeds, τ and stop target), the
unmitigated generation and then ``score`` (or ``wen``) at each ``--descent MAX_STEPS:LR[:STREAK]``
(STREAK: evaluations in a row at or below the stop target; default the mode's, 2 for score):

    .venv/bin/python scripts/bench_mitigation.py --demo-out demo_out --descent 10:0.05:1 20:0.1:1 20:0.1:2

Printed per setting: copy rate of the duplicated captions and its ratio to unmitigated, the share of
flagged duplicated generations whose descent reached its stop, held-out captions flagged, held-out
adherence, the duplicated generations' adherence to their own caption, and time per prompt as a
ratio to unmitigated generation in the same run. ``--json FILE`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memreg.copy_detect import build_copy_detector  # noqa: E402
from memreg.demo.mitigation import MitigationEvalSettings, evaluate_mitigation  # noqa: E402
from memreg.demo.run import load_eval_inputs, load_run_model  # noqa: E402
from memreg.mitigate import MitigationConfig  # noqa: E402


def descent(text: str) -> tuple[int, float, int | None]:
    """``MAX_STEPS:LR[:STREAK]`` -> (max_steps, lr, stop_streak or None for the mode's)."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        steps, lr, streak = int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"--descent takes MAX_STEPS:LR[:STREAK] (e.g. 20:0.1:2), got {text!r}") from None
    if steps < 0 or not lr > 0 or (streak is not None and streak < 1):
        raise argparse.ArgumentTypeError(f"--descent needs MAX_STEPS >= 0, LR > 0 and STREAK >= 1, got {text!r}")
    return steps, lr, streak


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-out", required=True, help="a finished demo's output dir (results.json, runs/)")
    p.add_argument("--run", default="none", help="the run whose model is mitigated (default none)")
    p.add_argument("--mode", choices=["score", "wen"], default="score")
    p.add_argument("--descent", type=descent, nargs="+", required=True, metavar="MAX_STEPS:LR[:STREAK]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    p.add_argument("--json", default=None, help="write every number here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.demo_out)
    results_file = out / "results.json"
    if not results_file.is_file():
        print(f"bench_mitigation: {results_file}: no results.json (run the demo first)", file=sys.stderr)
        return 2
    results = json.loads(results_file.read_text())
    run_dir = out / "runs" / args.run
    if not run_dir.is_dir():
        print(f"bench_mitigation: {run_dir}: no such run in this demo", file=sys.stderr)
        return 2
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    comps = load_run_model(Path(results["base_model"]), run_dir)
    _, memorized, heldout, ordinary = load_eval_inputs(Path(results["data"]))
    settings = MitigationEvalSettings(**results["settings"]["mitigation"])
    configs = {f"{args.mode} {s}:{lr:g}" + ("" if k is None else f":{k}"):
               MitigationConfig(mode=args.mode, max_steps=s, lr=lr, stop_streak=k) for s, lr, k in args.descent}
    mit = evaluate_mitigation(comps, comps.unet, build_copy_detector("ssim"), memorized, heldout, ordinary, settings,
                              configs)
    base = mit["none"]["copy_exact"]["rate"]
    print(f"{args.run}: {len(memorized)} duplicated captions x {settings.images_per_caption} seeds, "
          f"{min(settings.heldout_captions, len(heldout))} held-out captions; tau and stop target from "
          f"{min(settings.calibration_captions, len(ordinary))} ordinary captions")
    print(f"{'setting':16s} {'copy':>5s} {'x none':>6s} {'reached stop':>12s} {'held-out flagged':>16s} "
          f"{'adherence':>9s} {'dup adherence':>13s} {'time x':>6s}")
    for name, r in mit.items():
        ratio = r["copy_exact"]["rate"] / base if base else float("nan")
        reached = "-" if r["reached_stop"] is None else f"{r['reached_stop']:.2f}"
        print(f"{name:16s} {r['copy_exact']['rate']:>5.2f} {ratio:>6.2f} {reached:>12s} {r['heldout_flagged']:>16.3f} "
              f"{r['adherence']:>9.3f} {r['dup_adherence']:>13.3f} {r['time_x']:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(mit, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
