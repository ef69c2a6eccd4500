#!/usr/bin/env python
"""Cost of the memorization guards vs plain fine-tuning, for LoRA and for full fine-tuning.

    python scripts/bench_train.py [--modes lora full] [--reps 5] [--cycles 4] [--k 1 4] [--model DIR] [--data DIR]

Per training mode (``--modes``; ``lora``: the UNet's attention LoRA; ``full``: the whole UNet, text
encoder frozen; both from configs/tiny_cpu.yaml, batch 4, 32 px) one block of configs: ``none``
(plain fine-tuning); ``penalty defaults``: the guard keys reset to the
:class:`memreg.guards.anisotropy_gate.config.AnisotropyGateConfig` defaults (the YAML's guard
settings are dropped, except its small calibration size, a one-off setup cost); ``penalty every batch``: the same with
``every_n_steps 1, probes_per_step 1``; ``agc`` (anti-gradient control: a mask, no extra forward).
``--k 1 4`` adds the defaults at other probe counts (off by default: each adds a run per mode and
repetition; the issue's targets are about the defaults only). Runs are in-process; within a mode's
block they are interleaved (the config order rotates every repetition) after one warm-up run of
that mode; each run trains ``1 + cycles * every_n_steps`` (the defaults') steps and the first step
is dropped. Reported per config, as medians over repetitions, and as ratios to that mode's ``none``:

* step time: mean over whole penalty cycles (so active and inactive steps are weighted as in
  training), plus the medians of active steps (those whose log has ``guard/penalty``) and inactive;
* peak memory: CPU has no allocator peak counter (CUDA's max_memory_allocated), so a thread samples
  glibc's ``mallinfo2()`` in-use heap bytes (``uordblks + hblkhd``: every live malloc'd block,
  tensor buffers included, freed memory excluded) every 0.5 ms while a run trains. ``peak MB`` =
  that peak minus the value just before the run (weights, optimizer state, data, activations; the
  libraries' own memory is excluded); ``saved MB`` = the largest autograd-saved activation total
  of a step (tensors kept for backward, parameters excluded; activation checkpointing hides
  recomputed tensors from it).

Targets at the defaults, per mode: step time <= 1.3x, peak memory <= 1.2x the mode's ``none`` run
(one ``targets`` line per mode; ``penalty every batch`` gets the same ratios, for information).
main() returns ``{mode: {config: {metric: median}}}``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from memreg import log_tags as tags  # noqa: E402
from memreg.guards.anisotropy_gate.config import AnisotropyGateConfig  # noqa: E402
from memreg.training.config import load_config  # noqa: E402
from memreg.training.loop import train  # noqa: E402
from memreg.training.metrics import SavedTensorMeter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
MODES = ("lora", "full")
DEFAULTS = "penalty defaults"
EVERY_BATCH = "penalty every batch"
TARGET_STEP, TARGET_PEAK = 1.3, 1.2
KEPT_YAML_GUARD_KEYS = ("calibration_prompts", "calibration_seeds")  # setup cost only; tiny data set
METRICS = ("step", "active", "inactive", "act", "heap")


def write_imagefolder(root: Path, n: int = 16) -> Path:
    words = ["red", "blue", "green", "yellow", "white", "black", "pink", "brown"]
    shapes = ["circle", "square", "triangle", "star"]
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a {words[i % 8]} {shapes[i % 4]}"}) + "\n")
    return root


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapSampler:
    """Peak in-use heap (MB) of this process while active (glibc mallinfo2); ``base``: at entry."""

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.peak = self.base = 0.0
        self._stop = threading.Event()
        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _MallInfo2

    def used(self) -> float:
        m = self._libc.mallinfo2()
        return (m.uordblks + m.hblkhd) / 2**20

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = self.used()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


def run_once(argv: list[str], overrides: dict):
    cfg = load_config(argv, overrides=overrides)
    meter = SavedTensorMeter()
    gc.collect()  # the previous run's cyclic garbage, freed mid-run, would otherwise lower this run's peak - base
    with HeapSampler() as heap:
        res = train(cfg, meter=meter)
    return res, heap.peak - heap.base


def penalty_defaults() -> dict:
    """``guard.*`` overrides: the penalty at AnisotropyGateConfig's defaults (whatever tiny_cpu.yaml sets)."""
    d = AnisotropyGateConfig()
    return {"guard.type": "penalty", **{f"guard.{f.name}": getattr(d, f.name) for f in dataclasses.fields(d)
                                        if f.name not in KEPT_YAML_GUARD_KEYS}}


def block_configs(mode: str, extra_k: list[int]) -> dict[str, dict]:
    """config name -> ``load_config`` overrides, for one training mode."""
    pen = penalty_defaults()
    configs = {"none": {}, DEFAULTS: pen,
               EVERY_BATCH: {**pen, "guard.every_n_steps": 1, "guard.probes_per_step": 1},
               **{f"penalty k={k}": {**pen, "guard.probes_per_step": k} for k in extra_k},
               "agc": {"guard.type": "agc"}}
    return {name: {"mode": mode, **o} for name, o in configs.items()}


def run_argv(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    return ["--config", str(TINY), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--output_dir", str(out), "--max_train_steps", str(steps), "--report_to", "none",
            "--checkpointing_steps", "100000"]


def summarize(res, heap_peak: float) -> dict:
    """One run's figures; the first (warm-up) step is dropped."""
    logs = [lg for lg in res.logs if lg["step"] >= 2]
    times = [lg[tags.PERF_STEP_TIME] for lg in logs]
    active = [lg[tags.PERF_STEP_TIME] for lg in logs if tags.GUARD_PENALTY in lg]
    inactive = [lg[tags.PERF_STEP_TIME] for lg in logs if tags.GUARD_PENALTY not in lg]
    return {"step": statistics.fmean(times), "active": statistics.median(active) if active else None,
            "inactive": statistics.median(inactive) if inactive else None,
            "act": max(lg[tags.PERF_ACTIVATION_MB] for lg in res.logs), "heap": heap_peak}


def run_block(mode: str, configs: dict[str, dict], root: Path, model: Path, data: Path, steps: int, reps: int):
    """Medians per config of ``reps`` interleaved repetitions (after one warm-up run of the mode)."""
    run_once(run_argv(model, data, root / f"warmup_{mode}", 2), configs[DEFAULTS])
    names = list(configs)
    results = {k: {m: [] for m in METRICS} for k in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            out = root / f"{mode}_{rep}_{names.index(name)}"
            for m, v in summarize(*run_once(run_argv(model, data, out, steps), configs[name])).items():
                if v is not None:
                    results[name][m].append(v)
    return {k: {m: (statistics.median(v) if v else float("nan")) for m, v in r.items()} for k, r in results.items()}


def ratios(med: dict, name: str) -> tuple[float, float]:
    """(step time, peak memory) of ``name`` over the block's ``none``."""
    return med[name]["step"] / med["none"]["step"], med[name]["heap"] / med["none"]["heap"]


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED"


def print_block(mode: str, med: dict, header: str) -> None:
    print(header)
    hdr = (f"{'config':22s} {'step ms':>8s} {'ratio':>6s} {'active ms':>9s} {'inact ms':>8s} "
           f"{'peak MB':>8s} {'ratio':>6s} {'saved MB':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for name, m in med.items():
        st, mt = ratios(med, name)
        print(f"{name:22s} {1e3 * m['step']:8.1f} {st:6.2f} {1e3 * m['active']:9.1f} {1e3 * m['inactive']:8.1f} "
              f"{m['heap']:8.1f} {mt:6.2f} {m['act']:8.2f}")
    st, mt = ratios(med, DEFAULTS)
    print(f"targets at the defaults ({mode}): step time {st:.2f}x (<= {TARGET_STEP:.2f}: {verdict(st, TARGET_STEP)}), "
          f"peak memory {mt:.2f}x (<= {TARGET_PEAK:.2f}: {verdict(mt, TARGET_PEAK)})")
    st, mt = ratios(med, EVERY_BATCH)
    print(f"for information, {EVERY_BATCH} ({mode}): step time {st:.2f}x, peak memory {mt:.2f}x")


def block_header(mode: str, base, args, steps: int, elapsed: float) -> str:
    import torch


    d = AnisotropyGateConfig()
    what = "UNet attention LoRA" if mode == "lora" else "whole UNet, text encoder frozen"
    return (f"bench_train: tiny SD, mode {mode} ({what}; configs/tiny_cpu.yaml: batch {base.train_batch_size}, "
            f"{base.resolution} px), torch {torch.__version__}, {args.threads} threads, device cpu\n"
            f"{args.reps} interleaved repetitions x {steps} steps per run (first step dropped; penalty defaults: "
            f"k={d.probes_per_step} every {d.every_n_steps} steps), medians; {elapsed:.0f} s")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="training modes, one block each")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=4, help="penalty cycles (the defaults' every_n_steps) per run")
    ap.add_argument("--k", type=int, nargs="*", default=[], help="extra runs: the defaults at these probe counts")
    ap.add_argument("--model", default=None, help="tiny SD dir (default: build one in a temp dir)")
    ap.add_argument("--data", default=None, help="imagefolder (default: 16 random 32 px images)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.reps < 1 or args.cycles < 1 or any(k < 1 for k in args.k):
        ap.error("--reps, --cycles and --k must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch


    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    d = AnisotropyGateConfig()
    steps = 1 + args.cycles * d.every_n_steps
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        if args.model is None:
            from memreg.testing import build_tiny_sd

            model = build_tiny_sd(root / "tiny_sd")
        else:
            model = Path(args.model)
        data = Path(args.data) if args.data else write_imagefolder(root / "data")
        base = load_config(run_argv(model, data, root, steps))
        for mode in args.modes:
            t0 = time.time()
            out[mode] = run_block(mode, block_configs(mode, args.k), root, model, data, steps, args.reps)
            print_block(mode, out[mode], block_header(mode, base, args, steps, time.time() - t0))
    return out


if __name__ == "__main__":
    main()
