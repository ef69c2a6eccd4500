#!/usr/bin/env python
"""Cost of the memorization penalty: the tiny training run with guard none vs penalty.

    python scripts/bench_train.py [--reps 5] [--cycles 4] [--model DIR] [--data DIR]

Configs (all from configs/tiny_cpu.yaml, LoRA, batch 4): ``none``; ``penalty`` at the
:class:`memreg.guards.penalty.PenaltyConfig` defaults (k = 2 probes every 8th step); the penalty at
k = 1, 2, 4 probes (other settings default); ``agc`` (anti-gradient control: a mask, no extra forward).
Runs are in-process and interleaved (the config order rotates every repetition); each run trains
``1 + cycles * every_n_steps`` steps and the first step is dropped. Reported per config, as medians
over repetitions:

* step time: mean over whole penalty cycles (so active and inactive steps are weighted as in
  training), plus the active-step and inactive-step medians;
* peak memory: CPU has no allocator peak counter (CUDA's max_memory_allocated), so a thread samples
  glibc's ``mallinfo2()`` in-use heap bytes (``uordblks + hblkhd``: every live malloc'd block,
  tensor buffers included, freed memory excluded) every 0.5 ms while a run trains. ``peak MB`` =
  that peak minus the value just before the run (weights, optimizer, data, activations; the
  libraries' own memory is excluded); ``saved MB`` = the largest autograd-saved activation total
  of a step (tensors kept for backward, parameters excluded; activation checkpointing hides
  recomputed tensors from it).

Targets at the defaults: step time <= 1.3x, peak memory <= 1.2x the guard-none run.
"""

from __future__ import annotations

import argparse
import ctypes
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

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def write_imagefolder(root: Path, n: int = 16) -> Path:
    import numpy as np
    from PIL import Image

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


def run_once(argv: list[str]):
    from memreg.training.config import load_config
    from memreg.training.loop import train
    from memreg.training.metrics import SavedTensorMeter

    cfg = load_config(argv)
    meter = SavedTensorMeter()
    with HeapSampler() as heap:
        res = train(cfg, meter=meter)
    return cfg, res, heap.peak - heap.base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=4, help="penalty cycles (every_n_steps steps each) per run")
    ap.add_argument("--model", default=None, help="tiny SD dir (default: build one in a temp dir)")
    ap.add_argument("--data", default=None, help="imagefolder (default: 16 random 32 px images)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from memreg.guards.penalty import PenaltyConfig
    from memreg.training.config import load_config

    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    root = Path(tmp.name)
    if args.model is None:
        from memreg.testing import build_tiny_sd

        model = build_tiny_sd(root / "tiny_sd")
    else:
        model = Path(args.model)
    data = Path(args.data) if args.data else write_imagefolder(root / "data")

    d = PenaltyConfig()
    n = d.every_n_steps
    steps = 1 + args.cycles * n
    configs = {
        "none": [],
        f"penalty defaults (k={d.probes_per_step})": ["--guard.type", "penalty"],
        "penalty k=1": ["--guard.type", "penalty", "--guard.probes_per_step", "1"],
        "penalty k=2": ["--guard.type", "penalty", "--guard.probes_per_step", "2"],
        "penalty k=4": ["--guard.type", "penalty", "--guard.probes_per_step", "4"],
        "agc": ["--guard.type", "agc"],
    }
    base_cfg = load_config(["--config", str(TINY), "--pretrained_model_name_or_path", str(model),
                            "--train_data_dir", str(data)])
    names = list(configs)
    results: dict[str, dict[str, list]] = {k: {"step": [], "active": [], "inactive": [], "act": [], "heap": []}
                                           for k in names}
    warm = ["--config", str(TINY), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--output_dir", str(root / "warmup"), "--max_train_steps", "2", "--report_to", "none",
            "--guard.type", "penalty"]
    run_once(warm)  # one-time imports and caches stay out of the measured runs
    t_start = time.time()
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            out = root / f"run_{rep}_{names.index(name)}"
            argv_run = ["--config", str(TINY), "--pretrained_model_name_or_path", str(model),
                        "--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", str(steps),
                        "--report_to", "none", "--checkpointing_steps", "100000", *configs[name]]
            cfg, res, heap_peak = run_once(argv_run)
            logs = [lg for lg in res.logs if lg["step"] >= 2]  # drop the first (warm-up) step
            times = [lg["perf/step_time_s"] for lg in logs]
            active = [lg["perf/step_time_s"] for lg in logs if "guard/penalty" in lg]
            inactive = [lg["perf/step_time_s"] for lg in logs if "guard/penalty" not in lg]
            r = results[name]
            r["step"].append(statistics.fmean(times))
            if active:
                r["active"].append(statistics.median(active))
            r["inactive"].append(statistics.median(inactive) if inactive else float("nan"))
            r["act"].append(max(lg["perf/activation_mb"] for lg in res.logs))
            r["heap"].append(heap_peak)
    elapsed = time.time() - t_start

    med = {k: {m: (statistics.median(v) if v else float("nan")) for m, v in r.items()} for k, r in results.items()}
    base = med["none"]
    print(f"bench_train: tiny SD LoRA run (configs/tiny_cpu.yaml: batch {base_cfg.train_batch_size}, "
          f"{base_cfg.resolution} px), torch {torch.__version__}, {args.threads} threads, device cpu")
    print(f"{args.reps} interleaved repetitions x {steps} steps per run (first step dropped; "
          f"penalty every {n} steps), medians; {elapsed:.0f} s")
    hdr = (f"{'config':26s} {'step ms':>8s} {'ratio':>6s} {'active ms':>9s} {'inact ms':>8s} "
           f"{'peak MB':>8s} {'ratio':>6s} {'saved MB':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for name in names:
        m = med[name]
        print(f"{name:26s} {1e3 * m['step']:8.1f} {m['step'] / base['step']:6.2f} "
              f"{1e3 * m['active']:9.1f} {1e3 * m['inactive']:8.1f} {m['heap']:8.1f} {m['heap'] / base['heap']:6.2f} "
              f"{m['act']:8.2f}")
    dname = names[1]
    st = med[dname]["step"] / base["step"]
    mt = med[dname]["heap"] / base["heap"]
    print(f"targets at the defaults ({dname}): step time {st:.2f}x (<= 1.30: {'ok' if st <= 1.3 else 'MISSED'}), "
          f"peak memory {mt:.2f}x (<= 1.20: {'ok' if mt <= 1.2 else 'MISSED'})")
    tmp.cleanup()
    return med


if __name__ == "__main__":
    main()
