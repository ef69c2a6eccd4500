#!/usr/bin/env python
"""Time the anisotropy gate's own code on each training step, apart from the UNet.

    python scripts/bench_guard_steps.py --arch-dir DIR [--family sdxl] [--steps 5]

One LoRA run at the guard's defaults on a pipeline dir (e.g. one built by scripts/make_real_arch.py),
probing only at step 0 (``every_n_steps`` 1000), with wall-clock timers around
``AnisotropyGateGuard.extra_inputs``, ``.loss`` and ``.step_logs``. It prints every step's time and
each method's time per step: on a step without probes, the guard's whole cost. The end-to-end
ratio of scripts/bench_train.py compares two runs, so it also carries the machine's drift between
them; these timers run inside the one run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memreg.testing import load_script  # noqa: E402

METHODS = ("extra_inputs", "loss", "step_logs")


def main(argv=None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch-dir", required=True, help="a diffusers pipeline dir")
    ap.add_argument("--family", default="sd15", help="its memreg.arch family (for the image size)")
    ap.add_argument("--latent", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from memreg.arch.build import vae_scale

    bench = load_script(REPO / "scripts" / "bench_train.py")
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    size = vae_scale(args.family) * args.latent
    overrides = {"mode": "lora", **bench.penalty_defaults(), "guard.every_n_steps": 1000,
                 "guard.calibration_prompts": 4, "guard.calibration_seeds": 1}
    with bench.MethodTimer(*METHODS) as timer, tempfile.TemporaryDirectory(prefix="bench_guard_steps_") as tmp:
        data = bench.write_imagefolder(Path(tmp) / "data", size=size)
        cfg = bench.load_config(bench.run_argv(Path(args.arch_dir), data, Path(tmp) / "out", args.steps,
                                               bench.arch_argv(size, 2, args.steps)), overrides=overrides)
        res = bench.train(cfg, meter=bench.SavedTensorMeter())
    times = timer.seconds
    steps = [lg[bench.tags.PERF_STEP_TIME] for lg in res.logs]
    print("step times (s; step 1 probes):", " ".join(f"{s:.2f}" for s in steps))
    for m in METHODS:
        print(f"{m} per step (ms):", " ".join(f"{1e3 * t:.1f}" for t in times[m]))
    return {"steps": steps, **times}


if __name__ == "__main__":
    main()
