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
that mode; each run trains ``1 + cycles * MEASURE_EVERY`` steps and the first step is dropped.
The defaults' probe cadence (``every_n_steps: auto``) depends on the batch (every 16 steps at
batch 4, 32 at batch 2), too sparse to sample in a short run, so the guard's runs probe every
``MEASURE_EVERY`` steps, and a config's step time is the mean over its own cadence ``n``:
``(active + (n - 1) * inactive) / n`` (a probe step costs the same whatever the cadence). Reported
per config, as medians over repetitions, and as ratios to that mode's ``none``:

* step time: that cadence-weighted mean (a plain mean for configs without probes), plus the
  medians of active steps (those whose log has ``guard/penalty``) and inactive;
* peak memory: CPU has no allocator peak counter (CUDA's max_memory_allocated), so a thread samples
  glibc's ``mallinfo2()`` in-use heap bytes (``uordblks + hblkhd``: every live malloc'd block,
  tensor buffers included, freed memory excluded) every 0.5 ms while a run trains. ``peak MB`` =
  that peak minus the value just before the run (weights, optimizer state, data, activations; the
  libraries' own memory is excluded); ``saved MB`` = the largest autograd-saved activation total
  of a step (tensors kept for backward, parameters excluded; activation checkpointing hides
  recomputed tensors from it);
* spread: (max - min) / median of a config's step time over the repetitions, the machine's noise
  (a shared VM's speed can drift by 2x within minutes: read a ratio against it).

Targets at the defaults, per mode: step time <= 1.3x, peak memory <= 1.2x the mode's ``none`` run
(one ``targets`` line per mode; ``penalty every batch`` gets the same ratios, for information).
main() returns ``{mode: {config: {metric: median}}}``.

At a real architecture (``--arch sd15|sd21|sdxl``): a random-weight pipeline at the published
configuration (:mod:`memreg.arch`; ``--arch-dir`` reuses one built by scripts/make_real_arch.py),
latent ``--latent`` (8: 64 px images), batch ``--batch`` (default 2), configs ``none`` and
``penalty defaults`` only (``--configs`` adds others). Each run trains ``1 + cycles * MEASURE_EVERY``
steps and stops there without final outputs (``stop_at_step``: no multi-GB save per run). Targets
for LoRA: step time <= 1.10x, peak memory <= 1.05x; full fine-tuning is reported. It also prints the
guard's calibration cost per training caption (wall time of the guard's ``calibrate()`` in the
``penalty defaults`` runs: the base-value cache, captions x draws x 2 no-grad UNet samples, and the
calibration draws) and the score's time against its bare UNet call (scripts/bench_score.py's (a)).
Keep a run under 10 minutes on 2 cores: SD 1.5 ``--reps 3 --cycles 2``.

    python scripts/bench_train.py --arch sd15 --modes lora full --reps 3 --cycles 2
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
from memreg.arch.build import FAMILIES as ARCH_FAMILIES  # noqa: E402
from memreg.guards.anisotropy_gate.config import AnisotropyGateConfig, resolve_every_n  # noqa: E402
from memreg.guards.anisotropy_gate.probes import probe_samples_of  # noqa: E402
from memreg.training.config import load_config  # noqa: E402
from memreg.training.loop import train  # noqa: E402
from memreg.training.metrics import SavedTensorMeter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
MODES = ("lora", "full")
DEFAULTS = "penalty defaults"
EVERY_BATCH = "penalty every batch"
TARGET_STEP, TARGET_PEAK = 1.3, 1.2
ARCH_TARGETS = {"lora": (1.10, 1.05)}       # real architecture: (step, peak memory); full fine-tuning reported
ARCH_CONFIGS = ("none", DEFAULTS)
KEPT_YAML_GUARD_KEYS = ("calibration_prompts", "calibration_seeds")  # setup cost only; tiny data set
METRICS = ("step", "active", "inactive", "act", "heap")
MEASURE_EVERY = 2   # probe cadence of the measured guard runs: active and inactive steps in every run


def cadence(config: dict, batch: int) -> int | None:
    """The probe cadence ``config``'s guard would run at ``batch`` (None: no probes)."""
    if config.get("guard.type") != "penalty":
        return None
    d = AnisotropyGateConfig()
    k = config.get("guard.probes_per_step", d.probes_per_step)
    return resolve_every_n(config.get("guard.every_n_steps", d.every_n_steps), probe_samples_of(k, d.signal), batch,
                           d.probe_share)


def write_imagefolder(root: Path, n: int = 16, size: int = 32) -> Path:
    words = ["red", "blue", "green", "yellow", "white", "black", "pink", "brown"]
    shapes = ["circle", "square", "triangle", "star"]
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
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


def block_configs(mode: str, extra_k: list[int], only: list[str] | None = None) -> dict[str, dict]:
    """config name -> ``load_config`` overrides, for one training mode (``only``: these names, in order);
    the guard's cadence as configured (:func:`measured` sets the one the runs use)."""
    pen = penalty_defaults()
    configs = {"none": {}, DEFAULTS: pen,
               EVERY_BATCH: {**pen, "guard.every_n_steps": 1, "guard.probes_per_step": 1},
               **{f"penalty k={k}": {**pen, "guard.probes_per_step": k} for k in extra_k},
               "agc": {"guard.type": "agc"}}
    if only is not None:
        configs = {name: configs[name] for name in dict.fromkeys(["none", DEFAULTS, *only])}
    return {name: {"mode": mode, **o} for name, o in configs.items()}


def measured(config: dict) -> dict:
    """The overrides a run uses: probes every ``MEASURE_EVERY`` steps unless it probes every step."""
    if config.get("guard.type") == "penalty" and config.get("guard.every_n_steps") != 1:
        return {**config, "guard.every_n_steps": MEASURE_EVERY}
    return config


def run_argv(model: Path, data: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    return ["--config", str(TINY), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--output_dir", str(out), "--max_train_steps", str(steps), "--report_to", "none",
            "--checkpointing_steps", "100000", *extra]


def arch_argv(resolution: int, batch: int, steps: int) -> tuple[str, ...]:
    """Real-architecture runs: resolution and batch, and a stop after ``steps`` without final outputs."""
    return ("--resolution", str(resolution), "--train_batch_size", str(batch), "--max_train_steps", str(steps + 1),
            "--stop_at_step", str(steps))


def summarize(res, heap_peak: float, every: int | None = None) -> dict:
    """One run's figures; the first (warm-up) step is dropped. ``every``: the config's probe
    cadence, over which its step time is averaged (None: the plain mean)."""
    logs = [lg for lg in res.logs if lg["step"] >= 2]
    times = [lg[tags.PERF_STEP_TIME] for lg in logs]
    active = [lg[tags.PERF_STEP_TIME] for lg in logs if tags.GUARD_PENALTY in lg]
    inactive = [lg[tags.PERF_STEP_TIME] for lg in logs if tags.GUARD_PENALTY not in lg]
    act = statistics.median(active) if active else None
    inact = statistics.median(inactive) if inactive else None
    step = statistics.fmean(times)
    if every is not None and act is not None:
        step = act if every == 1 or inact is None else (act + (every - 1) * inact) / every
    return {"step": step, "active": act, "inactive": inact,
            "act": max(lg[tags.PERF_ACTIVATION_MB] for lg in res.logs), "heap": heap_peak}


class MethodTimer:
    """Wall time of each call of the named ``AnisotropyGateGuard`` methods while active
    (``seconds[name]``: one entry a call), e.g. ``calibrate``, the guard's one-off setup."""

    def __init__(self, *names: str):
        self.names = names
        self.seconds: dict[str, list[float]] = {n: [] for n in names}

    def __enter__(self):
        from memreg.guards.anisotropy_gate.guard import AnisotropyGateGuard

        self._cls = AnisotropyGateGuard
        self._orig = {n: getattr(AnisotropyGateGuard, n) for n in self.names}
        for n in self.names:
            setattr(AnisotropyGateGuard, n, self._timed(n, self._orig[n]))
        return self

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name].append(time.perf_counter() - t0)
        return timed

    def __exit__(self, *exc):
        for n, fn in self._orig.items():
            setattr(self._cls, n, fn)


def run_block(mode: str, configs: dict[str, dict], root: Path, model: Path, data: Path, steps: int, reps: int,
              batch: int, extra: tuple[str, ...] = (), warmup_extra: tuple[str, ...] = ()):
    """Medians per config of ``reps`` interleaved repetitions (after one warm-up run of the mode)."""
    run_once(run_argv(model, data, root / f"warmup_{mode}", 2, warmup_extra), measured(configs[DEFAULTS]))
    names = list(configs)
    results = {k: {m: [] for m in METRICS} for k in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            out = root / f"{mode}_{rep}_{names.index(name)}"
            res, heap = run_once(run_argv(model, data, out, steps, extra), measured(configs[name]))
            figures = summarize(res, heap, cadence(configs[name], batch))
            del res   # it holds the run's model: freed before the next run loads its own
            for m, v in figures.items():
                if v is not None:
                    results[name][m].append(v)
    med = {k: {m: (statistics.median(v) if v else float("nan")) for m, v in r.items()} for k, r in results.items()}
    for k, r in results.items():   # the machine's noise: the spread of a config's step time over repetitions
        med[k]["spread"] = (max(r["step"]) - min(r["step"])) / med[k]["step"] if r["step"] else float("nan")
    return med


def ratios(med: dict, name: str) -> tuple[float, float]:
    """(step time, peak memory) of ``name`` over the block's ``none``."""
    return med[name]["step"] / med["none"]["step"], med[name]["heap"] / med["none"]["heap"]


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED"


def print_block(mode: str, med: dict, header: str, targets: tuple[float, float] | None = (TARGET_STEP, TARGET_PEAK)) -> None:
    print(header)
    hdr = (f"{'config':22s} {'step ms':>8s} {'ratio':>6s} {'active ms':>9s} {'inact ms':>8s} "
           f"{'peak MB':>8s} {'ratio':>6s} {'saved MB':>8s} {'spread':>6s}")
    print(hdr)
    print("-" * len(hdr))
    for name, m in med.items():
        st, mt = ratios(med, name)
        print(f"{name:22s} {1e3 * m['step']:8.1f} {st:6.2f} {1e3 * m['active']:9.1f} {1e3 * m['inactive']:8.1f} "
              f"{m['heap']:8.1f} {mt:6.2f} {m['act']:8.2f} {m['spread']:6.2f}")
    st, mt = ratios(med, DEFAULTS)
    if targets is None:
        print(f"at the defaults ({mode}, reported, no target): step time {st:.2f}x, peak memory {mt:.2f}x")
    else:
        ts, tm = targets
        print(f"targets at the defaults ({mode}): step time {st:.2f}x (<= {ts:.2f}: {verdict(st, ts)}), "
              f"peak memory {mt:.2f}x (<= {tm:.2f}: {verdict(mt, tm)})")
    if EVERY_BATCH in med:
        st, mt = ratios(med, EVERY_BATCH)
        print(f"for information, {EVERY_BATCH} ({mode}): step time {st:.2f}x, peak memory {mt:.2f}x")


def block_header(mode: str, base, args, steps: int, elapsed: float) -> str:
    import torch


    d = AnisotropyGateConfig()
    what = "UNet attention LoRA" if mode == "lora" else "whole UNet, text encoder frozen"
    model = "tiny SD" if args.arch is None else f"{args.arch} (published architecture, random weights)"
    return (f"bench_train: {model}, mode {mode} ({what}; configs/tiny_cpu.yaml: batch {base.train_batch_size}, "
            f"{base.resolution} px), torch {torch.__version__}, {args.threads} threads, device cpu\n"
            f"{args.reps} interleaved repetitions x {steps} steps per run (first step dropped; penalty defaults: "
            f"k={d.probes_per_step}, every_n_steps {d.every_n_steps} = every "
            f"{cadence(penalty_defaults(), base.train_batch_size)} steps at this batch, measured probing every "
            f"{MEASURE_EVERY} and weighted to that cadence), medians; {elapsed:.0f} s")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="training modes, one block each")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=4, help="probe cycles (MEASURE_EVERY steps each) per run")
    ap.add_argument("--k", type=int, nargs="*", default=[], help="extra runs: the defaults at these probe counts")
    ap.add_argument("--model", default=None, help="tiny SD dir (default: build one in a temp dir)")
    ap.add_argument("--data", default=None, help="imagefolder (default: 16 random 32 px images)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", choices=ARCH_FAMILIES, default=None,
                    help="bench on a random-weight pipeline at this published architecture (memreg.arch)")
    ap.add_argument("--arch-dir", default=None, help="with --arch: a pipeline dir built by scripts/make_real_arch.py")
    ap.add_argument("--latent", type=int, default=8, help="with --arch: UNet latent size (images: 8x that, px)")
    ap.add_argument("--batch", type=int, default=None, help="train batch (default: 4 tiny, 2 with --arch)")
    ap.add_argument("--configs", nargs="*", default=None, choices=[EVERY_BATCH, "agc"],
                    help="with --arch: configs besides none and the defaults (default: none)")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.cycles < 1 or any(k < 1 for k in args.k):
        ap.error("--reps, --cycles and --k must be >= 1")
    if args.arch is None and (args.arch_dir or args.configs is not None):
        ap.error("--arch-dir and --configs need --arch")
    if args.arch is not None and (args.batch or 2) < 2:
        ap.error("--batch must be >= 2 with --arch")
    return args


def captions_of(data: Path) -> list[str]:
    return [json.loads(line)["text"] for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]


def score_cost(model: Path, batch: int, resolution: int, reps: int = 5) -> dict:
    """scripts/bench_score.py's (a) on ``model``: the bare UNet call on the score's 4B samples vs
    ``AnisotropyScore`` on B prompts (medians of interleaved repetitions after one warm-up); the
    family's prompt encoder and UNet call (SDXL: with its added conditioning)."""
    import torch

    from memreg.families import denoise, prompt_encoder
    from memreg.models import load_components
    from memreg.score import make_scorer, pure_noise_latents
    from memreg.testing import load_script

    bench_score = load_script(REPO / "scripts" / "bench_score.py")
    comps = load_components(str(model), with_vae=False)
    scorer = make_scorer(comps.unet, comps.scheduler)
    encoder = prompt_encoder(comps, image_size=resolution)
    cond = encoder.encode(bench_score.FALLBACK_PROMPTS[:batch]).embeds
    uncond = encoder.uncond()
    x = pure_noise_latents(comps.unet, batch, torch.Generator().manual_seed(0))
    sample, t, emb = scorer.unet_inputs(x, cond, uncond)

    @torch.no_grad()
    def bare():
        return denoise(comps.unet, sample, t, emb).sample

    @torch.no_grad()
    def score():
        return scorer(x, cond, uncond).score

    med = bench_score.interleaved({"bare": bare, "score": score}, reps, 1, torch.device("cpu"))
    return {"bare": med["bare"], "score": med["score"], "ratio": med["score"] / med["bare"], "samples": 4 * batch}


def print_arch_extras(args, calib_s: list[float], captions: list[str], cost: dict) -> None:
    d = AnisotropyGateConfig()
    n = len(set(captions))
    if calib_s:
        c = statistics.median(calib_s)
        print(f"calibration ({args.arch}, penalty defaults, {len(calib_s)} runs): {c:.2f} s for {n} distinct training "
              f"captions = {c / n:.3f} s per caption (base-value cache: {d.reference_draws} draws x 2 no-grad UNet "
              f"samples a caption, plus the calibration draws); paid once per run, outside the step time")
    print(f"score vs its bare UNet call ({args.arch}, B={cost['samples'] // 4}): bare UNet call on "
          f"{cost['samples']} samples {1e3 * cost['bare']:.1f} ms, AnisotropyScore {1e3 * cost['score']:.1f} ms, "
          f"ratio {cost['ratio']:.3f}x (target <= 1.05x: {verdict(cost['ratio'], 1.05)}); "
          f"{cost['samples'] // 4 / cost['score']:.2f} prompts/s")


def main(argv=None):
    args = parse_args(argv)
    import torch


    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    steps = 1 + args.cycles * MEASURE_EVERY
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        if args.arch is not None:
            return main_arch(args, root, steps)
        if args.model is None:
            from memreg.testing import build_tiny_sd

            model = build_tiny_sd(root / "tiny_sd")
        else:
            model = Path(args.model)
        data = Path(args.data) if args.data else write_imagefolder(root / "data")
        extra = ("--train_batch_size", str(args.batch)) if args.batch else ()
        base = load_config(run_argv(model, data, root, steps, extra))
        for mode in args.modes:
            t0 = time.time()
            out[mode] = run_block(mode, block_configs(mode, args.k), root, model, data, steps, args.reps,
                                  base.train_batch_size, extra, extra)
            print_block(mode, out[mode], block_header(mode, base, args, steps, time.time() - t0))
    return out


def main_arch(args, root: Path, steps: int) -> dict:
    """The blocks at a real architecture, then the calibration and score costs."""
    from memreg.arch.build import build_pipeline_dir, vae_scale

    t0 = time.time()
    model = Path(args.arch_dir) if args.arch_dir else build_pipeline_dir(args.arch, root / args.arch,
                                                                           sample_size=args.latent)
    if not args.arch_dir:
        print(f"built {args.arch} (latent {args.latent}) in {time.time() - t0:.0f} s")
    resolution = vae_scale(args.arch) * args.latent
    batch = args.batch or 2
    data = Path(args.data) if args.data else write_imagefolder(root / "data", size=resolution)
    extra = arch_argv(resolution, batch, steps)
    base = load_config(run_argv(model, data, root, steps, extra))
    out = {}
    with MethodTimer("calibrate") as timer:
        calib = timer.seconds["calibrate"]
        for mode in args.modes:
            t0 = time.time()
            n_before = len(calib)
            out[mode] = run_block(mode, block_configs(mode, args.k, args.configs or []), root, model, data, steps,
                                  args.reps, batch, extra, arch_argv(resolution, batch, 1))
            del calib[n_before]     # the warm-up run's
            print_block(mode, out[mode], block_header(mode, base, args, steps, time.time() - t0),
                        ARCH_TARGETS.get(mode))
    print_arch_extras(args, calib, captions_of(data), score_cost(model, batch, resolution))
    return out


if __name__ == "__main__":
    main()
