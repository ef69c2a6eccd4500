"""``memreg detect``: score memorized vs non-memorized prompt lists and report detection metrics.

Library side: ``score_prompts`` (``memreg.score.score_prompts`` plus Wen's baseline, truncation and
timing; also used by ``scripts/bench_score.py``),
``fit_weights`` and ``run_detect``. CLI side: ``add_arguments(parser)`` and ``run(args) -> int``,
plugged into ``memreg.cli``.

Scale out: under ``accelerate launch -m memreg.cli detect ...`` (or with ``--shard-size`` on one
process) the prompt list is cut into shards of ``--shard-size`` prompts (a multiple of
``--batch-size``, so the batches, hence the float results, are the same as one process's), each
process scores its shards into ``--out/parts/`` (:mod:`memreg.sharding`: atomic parts, finished
shards skipped on a rerun) and the main process merges them and writes the usual outputs.

Noise: for noise seed ``s`` every prompt is scored on latents drawn from
``torch.Generator().manual_seed(s)`` on the CPU (so they do not depend on the device either):

* ``--noise shared`` (default, the paper's released code): one x_T per seed, the same for every
  prompt; a score then depends only on (prompt, seed), never on batch size or prompt order.
* ``--noise per-prompt``: each prompt gets its own x_T from a generator seeded by (s, a hash of
  the prompt text); again independent of batch size and order.

With shared noise the unconditional predictions eps(x_T, t, u) are the same for every prompt, so
they are computed once per seed (``shared_noise`` of ``memreg.score.score_prompts``) and each batch needs a UNet call on 2B
conditional samples only; per-prompt noise uses ``AnisotropyScore``'s 4B-sample call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memreg.argtypes import finite_float
from memreg.errors import MemregError
from memreg.metrics import DEFAULT_FPRS, detection_metrics, fpr_key, roc_points
from memreg.models import ModelError, check_model_path, load_components, parse_dtype
from memreg.prompt_io import PromptFileError, read_prompts
from memreg.score import (NOISE_MODES, PRESETS, SPACES, AnisotropyScore, ddim_timesteps, noise_latents,  # noqa: F401
                          prompt_seed, wen_multistep_norm)
from memreg.score import score_prompts as score_batches
from memreg.sharding import (PARTS_DIR, apply_plan, busiest_seconds, plan_out, process_state,
                             read_part, run_shards, shard_ranges)

OUTPUT_FILES = ("scores.jsonl", "report.json", "roc.png")
TERMS = ("norm", "align", "score", "wen")
MEM_LABEL, NONMEM_LABEL = 1, 0


class DetectError(MemregError, ValueError):
    """Bad input to ``memreg detect`` (one line, names the file/field); the CLI exits with 2."""


# --------------------------------------------------------------------------------------------
# Scoring loop
# --------------------------------------------------------------------------------------------

@dataclass
class ScoredPrompts:
    """Per-prompt terms averaged over the noise seeds (float64 arrays of shape (N,))."""

    norm: np.ndarray
    align: np.ndarray
    score: np.ndarray
    wen: np.ndarray | None
    truncated: list[bool]
    wen_reused_norm: bool = False
    seconds: float = 0.0

    def term(self, name: str) -> np.ndarray:
        return getattr(self, name)


def wen_reuses_norm(scorer: AnisotropyScore, scheduler, wen_steps: int) -> bool:
    """True when Wen et al.'s single-step norm is exactly the score's norm term.

    That needs one step, the norm taken on eps, and t_hi equal to the first DDIM timestep (the
    one Wen's run starts from); the first step's guidance scale does not enter the norm.
    """
    return (wen_steps == 1 and scorer.space == "eps"
            and scorer.t_hi == ddim_timesteps(scheduler.config)[0])


@torch.no_grad()
def score_prompts(scorer: AnisotropyScore, encoder, scheduler, prompts: list[str], *,
                  seeds=(0,), batch_size: int = 16, wen_steps: int = 1, noise: str = "shared",
                  reuse_wen: bool = True, share_uncond: bool = True, progress=None) -> ScoredPrompts:
    """Score ``prompts`` in batches, averaging norm/align/score (and Wen's norm) over ``seeds``.

    Each batch is encoded once (``encoder``: a ``memreg.encoding.PromptEncoder``; the empty prompt
    is encoded once for the whole run) and scored once per seed with ``scorer``: one UNet call on
    4 x batch samples, or, with ``noise="shared"`` and ``share_uncond``, on the 2 x batch
    conditional samples plus the seed's cached unconditional outputs (same
    numbers up to float rounding). ``wen_steps=0`` skips the Wen baseline. With ``reuse_wen`` and
    ``wen_reuses_norm(...)`` Wen's value is the norm term (no extra UNet call); otherwise it
    comes from ``memreg.score.wen_multistep_norm`` on the same latents. ``progress``: an object
    with ``update(n)`` (e.g. tqdm), advanced by the prompt count of each batch and seed.
    """
    seeds = [int(s) for s in seeds]
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    n = len(prompts)
    wen = np.zeros(n, dtype=np.float64)
    truncated: list[bool] = []
    reused = bool(reuse_wen and wen_steps >= 1 and wen_reuses_norm(scorer, scheduler, wen_steps))
    unet = scorer.unet
    device = unet.device
    uncond = encoder.uncond()

    def encode(batch: list[str]) -> torch.Tensor:
        enc = encoder.encode(batch)
        truncated.extend(enc.truncated)
        return enc.embeds

    def on_batch(lo, seed, x, cond, out):
        sl = slice(lo, lo + cond.shape[0])
        if reused:
            wen[sl] += out.norm.double().cpu().numpy()
        elif wen_steps >= 1:
            wen[sl] += wen_multistep_norm(unet, scheduler, x, cond, uncond, steps=wen_steps,
                                          prediction_type=scorer.prediction_type).double().cpu().numpy()
        if progress is not None:
            progress.update(cond.shape[0])

    start = time.perf_counter()
    out = score_batches(scorer, encode, uncond, prompts,
                        lambda batch, lo, seed: noise_latents(unet, batch, seed, noise, device=device),
                        draws=seeds, batch_size=batch_size, shared_noise=noise == "shared" and share_uncond,
                        on_batch=on_batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    k = len(seeds)
    mean = {t: getattr(out, t).double().mean(dim=0).numpy() for t in ("norm", "align", "score")}
    return ScoredPrompts(norm=mean["norm"], align=mean["align"], score=mean["score"],
                         wen=wen / k if wen_steps >= 1 else None, truncated=truncated,
                         wen_reused_norm=reused, seconds=seconds)


# --------------------------------------------------------------------------------------------
# Weight fitting
# --------------------------------------------------------------------------------------------

def fit_weights(norm, align, labels, folds: int = 5, seed: int = 0, fprs=DEFAULT_FPRS) -> dict:
    """Fit g1/g2 by logistic regression on standardized [norm, align].

    Out-of-fold decision values from stratified k-fold CV (k capped by the smaller class; the
    scaler is fitted inside each fold) give the reported AUC/TPRs; the weights come from a fit on
    all prompts, in standardized units and converted back to raw units (g1 = w1 / std(norm),
    g2 = w2 / std(align); the intercept does not affect ranking).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.column_stack([np.asarray(norm, dtype=np.float64), np.asarray(align, dtype=np.float64)])
    y = np.asarray(labels).astype(int)
    k = min(int(folds), int(np.bincount(y, minlength=2).min()))
    if k < 2:
        return {"skipped": f"needs at least 2 prompts of each label for cross-validation (k={k})"}
    model = make_pipeline(StandardScaler(), LogisticRegression(random_state=seed))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    oof = cross_val_predict(model, X, y, cv=cv, method="decision_function")
    model.fit(X, y)
    scaler, lr = model[0], model[1]
    w1, w2 = (float(v) for v in lr.coef_[0])
    g1, g2 = w1 / float(scaler.scale_[0]), w2 / float(scaler.scale_[1])
    return {
        "folds": k,
        "standardized": {"w_norm": w1, "w_align": w2, "intercept": float(lr.intercept_[0]),
                         "mean": [float(v) for v in scaler.mean_], "std": [float(v) for v in scaler.scale_]},
        "g1": g1,
        "g2": g2,
        "g2_over_g1": g2 / g1 if g1 > 0 else None,
        "out_of_fold": detection_metrics(y, oof, fprs).to_dict(),
        "_oof_decision": oof,
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how the model runs: shared by ``memreg detect`` and ``memreg generate``."""
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float16 on cuda, else float32)")
    p.add_argument("--revision", default=None, help="hub revision of --model")
    p.add_argument("--variant", default=None, help="weight variant of --model (e.g. fp16)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


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


def run(args: argparse.Namespace) -> int:
    try:
        run_detect(args)
    except MemregError as e:
        print(f"memreg detect: error: {e}", file=sys.stderr)
        return 2
    return 0


def _resolve_weights(args) -> tuple[str | None, float, float]:
    if args.preset is not None and (args.g1 is not None or args.g2 is not None):
        raise DetectError("--preset and --g1/--g2 are exclusive; give one or the other")
    if args.g1 is None and args.g2 is None:
        preset = args.preset or "sd1"
        return preset, *PRESETS[preset]
    d1, d2 = PRESETS["sd1"]
    return None, (d1 if args.g1 is None else args.g1), (d2 if args.g2 is None else args.g2)


def _validate_args(args) -> None:
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


def _read(path: str, flag: str):
    try:
        return read_prompts(path)
    except PromptFileError as e:
        raise PromptFileError(f"{flag}: {e}") from None


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DetectError(f"--out {str(out)!r} exists and is not a directory")
    existing = [f for f in OUTPUT_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise DetectError(f"--out {str(out)!r} already has {', '.join(existing)}; pass --overwrite to replace")


def _check_timesteps(args) -> None:
    """Range-check --t-hi/--t-lo against the scheduler config (a small JSON) before loading weights."""
    if args.t_hi is None and args.t_lo is None:
        return
    from diffusers import DDPMScheduler

    try:
        cfg = DDPMScheduler.load_config(args.model, subfolder="scheduler", revision=args.revision)
    except OSError:
        return  # load_components reports it
    n_train = int(cfg.get("num_train_timesteps", 1000))
    for flag, t in (("--t-hi", args.t_hi), ("--t-lo", args.t_lo)):
        if t is not None and not 0 <= t < n_train:
            raise DetectError(f"{flag} {t} is outside the scheduler's [0, {n_train}) timesteps")


def _versions() -> dict:
    import diffusers
    import sklearn
    import transformers

    try:
        from importlib.metadata import version
        memreg_version = version("memreg")
    except Exception:  # not installed as a distribution
        memreg_version = None
    return {"memreg": memreg_version, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "scikit-learn": sklearn.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _device_and_dtype(args, state) -> tuple[torch.device, torch.dtype]:
    """``--device`` (default: the process's accelerate device, else cuda if available) and ``--dtype``."""
    try:
        default = str(state.device) if state is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(args.device or default)
    except RuntimeError as e:
        raise DetectError(f"--device {args.device!r}: {e}") from None
    try:
        dtype = parse_dtype(args.dtype or ("float16" if device.type == "cuda" else "float32"))
    except ModelError as e:
        raise DetectError(f"--dtype: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DetectError(f"--device {args.device}: CUDA is not available")
    return device, dtype


def run_detect(args: argparse.Namespace) -> dict | None:
    """The whole ``memreg detect`` run; returns the report dict (None on a sharded run's other
    processes). Raises DetectError & co on bad input."""
    _validate_args(args)
    preset, g1, g2 = _resolve_weights(args)
    # Cheap checks first: prompt files, output dir, model dir -- all before loading any weights.
    mem = _read(args.mem, "--mem")
    nonmem = _read(args.nonmem, "--nonmem")
    out = Path(args.out)
    state = process_state() if args.shard_size is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    fp = None if state is None else _fingerprint(args, mem.prompts, nonmem.prompts, preset)
    if state is None:
        _check_out_dir(out, args.overwrite)
    else:
        action = plan_out(out, fp, args.overwrite, OUTPUT_FILES, "a detect run")
    check_model_path(args.model, ("unet", "text_encoder", "tokenizer", "scheduler"))
    device, dtype = _device_and_dtype(args, state)

    _check_timesteps(args)
    from memreg.encoding import PromptEncoder

    t0 = time.perf_counter()
    comps = load_components(args.model, revision=args.revision, variant=args.variant, dtype=dtype,
                            device=device, with_vae=False)
    load_s = time.perf_counter() - t0
    try:
        scorer = AnisotropyScore(comps.unet, comps.scheduler, t_hi=args.t_hi, t_lo=args.t_lo,
                                 g1=g1, g2=g2, space=args.space)
    except ValueError as e:
        raise DetectError(str(e)) from None
    encoder = PromptEncoder(comps.tokenizer, comps.text_encoder, device=device)
    seeds = list(range(args.seed, args.seed + args.seeds))

    prompts = mem.prompts + nonmem.prompts
    labels = np.array([MEM_LABEL] * len(mem.prompts) + [NONMEM_LABEL] * len(nonmem.prompts))
    from tqdm.auto import tqdm

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
            return None  # not the main process: its parts are written, the main process merges them

    for t in TERMS:
        bad = np.flatnonzero(~np.isfinite(res.term(t)))
        if bad.size:
            raise DetectError(f"{bad.size} prompt(s) got a non-finite {t} (first: {prompts[bad[0]]!r}); "
                              f"with --dtype {args.dtype or dtype} try bfloat16 or float32")
    metrics = {t: detection_metrics(labels, res.term(t)).to_dict() for t in TERMS}
    fitted = None
    if args.fit_weights:
        fitted = fit_weights(res.norm, res.align, labels, folds=args.cv_folds)
    report = _report(args, mem, nonmem, res, scorer, encoder, metrics, fitted, preset, seeds, dtype, device, load_s)
    if state is not None:
        report["settings"]["shard_size"] = _shard_size(args)
        report["timing"]["processes"] = state.num_processes

    _write_outputs(out, prompts, labels, res, fitted, report, args.model)
    return report


# --------------------------------------------------------------------------------------------
# Sharded scoring: accelerate processes (or one, resumable), parts merged by the main process
# --------------------------------------------------------------------------------------------

SHARD_BATCHES = 16  # default --shard-size under accelerate launch, in batches


def _shard_size(args) -> int:
    return args.shard_size or SHARD_BATCHES * args.batch_size


def _fingerprint(args, mem: list[str], nonmem: list[str], preset: str | None) -> dict:
    """The settings a part's numbers depend on; finished parts are reused only under the same."""
    digest = hashlib.sha256(json.dumps([mem, nonmem], ensure_ascii=False).encode("utf-8")).hexdigest()
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    keys = ("revision", "variant", "seeds", "seed", "noise", "batch_size", "g1", "g2", "t_hi", "t_lo",
            "space", "wen_steps", "dtype", "device")
    return {"model": model, "prompts_sha256": digest, "prompts": len(mem) + len(nonmem), "preset": preset,
            "shard_size": _shard_size(args), **{k: getattr(args, k) for k in keys}}


def score_sharded(args, state, parts: Path, prompts: list[str], score) -> ScoredPrompts | None:
    """Score this process's unfinished shards of ``prompts`` with ``score(batch, show)`` into
    ``parts``; the main process returns the merged :class:`ScoredPrompts`, the others None."""
    size = _shard_size(args)

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


def merge_parts(parts: Path, n: int, shard_size: int) -> ScoredPrompts:
    """The :class:`ScoredPrompts` of all ``n`` prompts from the finished parts, in prompt order;
    ``seconds`` is the busiest process's scoring time."""
    terms = {t: np.full(n, np.nan) for t in TERMS}
    truncated, reused, has_wen = [False] * n, True, True
    num = len(shard_ranges(n, shard_size))
    for k in range(num):
        head, items = read_part(parts, k)
        reused &= bool(head["wen_reused_norm"])
        for x in items:
            has_wen &= x["wen"] is not None
            for t in TERMS:
                terms[t][x["i"]] = np.nan if x[t] is None else x[t]
            truncated[x["i"]] = x["truncated"]
    return ScoredPrompts(norm=terms["norm"], align=terms["align"], score=terms["score"],
                         wen=terms["wen"] if has_wen else None, truncated=truncated, wen_reused_norm=reused,
                         seconds=busiest_seconds(parts, num, "score_s"))


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def plot_roc(path: Path, labels, curves: dict[str, np.ndarray], title: str = "") -> None:
    """One ROC curve per entry of ``curves`` (Agg canvas; no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from memreg.metrics import auroc

    fig = Figure(figsize=(5.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, scores in curves.items():
        fpr, tpr, _ = roc_points(labels, scores)
        style = "--" if name.startswith("fitted") else ("-." if name == "wen" else "-")
        ax.plot(fpr, tpr, style, label=f"{name} (AUC {auroc(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def format_table(report: dict) -> str:
    """The printed summary: one row per term, both TPR conventions."""
    keys = [fpr_key(x) for x in DEFAULT_FPRS]
    head = (["term", "AUC"] + [f"TPR@{k}FPR" for k in keys] + [f"TPR@~{k}FPR" for k in keys])
    rows = []
    s = report["settings"]
    names = {"norm": "norm", "align": "align", "score": f"score (g1={s['g1']:g}, g2={s['g2']:g})",
             "wen": f"wen ({s['wen_steps']} step{'s' if s['wen_steps'] != 1 else ''})"}
    for t in TERMS:
        m = report["metrics"][t]
        rows.append([names[t], f"{m['auc']:.3f}"] + [f"{m['tpr_at_fpr'][k]:.3f}" for k in keys]
                    + [f"{m['tpr_at_fpr_closest'][k]:.3f}" for k in keys])
    fw = report.get("fit_weights")
    if fw and "out_of_fold" in fw:
        m = fw["out_of_fold"]
        rows.append([f"fitted (g1={fw['g1']:.3g}, g2={fw['g2']:.3g}; {fw['folds']}-fold OOF)", f"{m['auc']:.3f}"]
                    + [f"{m['tpr_at_fpr'][k]:.3f}" for k in keys] + [f"{m['tpr_at_fpr_closest'][k]:.3f}" for k in keys])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    d = report["data"]
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines.append("TPR@x: largest TPR with FPR <= x; TPR@~x: ROC point with FPR closest to x (paper's code).")
    if fw and "skipped" in fw:
        lines.append(f"fit-weights skipped: {fw['skipped']}")
    tm = report["timing"]
    pps = f"{tm['prompts_per_s']:.1f}" if tm["prompts_per_s"] else "n/a"
    lines.append(f"{d['mem']['prompts']} mem + {d['nonmem']['prompts']} nonmem prompts, seeds {s['seeds']}, "
                 f"batch {s['batch_size']}, {s['device']}/{s['dtype']}, t_hi={s['t_hi']} t_lo={s['t_lo']}, "
                 f"space={s['space']}, {report['prediction_type']}; {pps} prompts/s; "
                 f"blank lines skipped {d['blank_lines_skipped']}, truncated {d['truncated_prompts']}")
    return "\n".join(lines)


def _report(args, mem, nonmem, res, scorer, encoder, metrics, fitted, preset, seeds, dtype, device,
            load_s: float) -> dict:
    """``report.json``: settings, data counts, metrics, fitted weights, timing and versions."""
    n_mem = len(mem.prompts)
    trunc_mem = sum(res.truncated[:n_mem])
    trunc_nonmem = sum(res.truncated[n_mem:])
    return {
        "command": "detect",
        "model": args.model,
        "revision": args.revision,
        "variant": args.variant,
        "prediction_type": scorer.prediction_type,
        "settings": {
            "t_hi": scorer.t_hi, "t_lo": scorer.t_lo, "g1": scorer.g1, "g2": scorer.g2, "preset": preset,
            "seeds": seeds, "noise": args.noise, "batch_size": args.batch_size, "space": args.space,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device), "wen_steps": args.wen_steps,
            "wen_reused_norm": res.wen_reused_norm, "uncond_shared": args.noise == "shared",
            "fit_weights": bool(args.fit_weights), "cv_folds": args.cv_folds if args.fit_weights else None,
        },
        "data": {
            "mem": {"path": mem.path, "label": MEM_LABEL, "prompts": n_mem,
                    "blank_lines_skipped": mem.blank_lines, "truncated": int(trunc_mem)},
            "nonmem": {"path": nonmem.path, "label": NONMEM_LABEL, "prompts": len(nonmem.prompts),
                       "blank_lines_skipped": nonmem.blank_lines, "truncated": int(trunc_nonmem)},
            "blank_lines_skipped": mem.blank_lines + nonmem.blank_lines,
            "truncated_prompts": int(trunc_mem + trunc_nonmem),
            "max_tokens": encoder.max_length,
        },
        "metrics": metrics,
        "metric_conventions": {
            "tpr_at_fpr": "largest TPR over ROC points with FPR <= x",
            "tpr_at_fpr_closest": "TPR of the ROC point with FPR closest to x (paper's released code)",
        },
        "fit_weights": None if fitted is None else {k: v for k, v in fitted.items() if not k.startswith("_")},
        "timing": {"load_s": load_s, "score_s": res.seconds,
                   "prompts_per_s": len(res.norm) * len(seeds) / res.seconds if res.seconds > 0 else None,
                   "prompts_per_s_note": "prompt-seed evaluations per second of the scoring loop "
                                         "(encoding, score and Wen baseline; model loading excluded)"},
        "versions": _versions(),
    }


def _write_outputs(out: Path, prompts: list[str], labels, res, fitted, report: dict, model: str) -> None:
    """``scores.jsonl``, ``report.json`` and ``roc.png``; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "scores.jsonl").open("w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            row = {"prompt": p, "label": int(labels[i]), "norm": float(res.norm[i]),
                   "align": float(res.align[i]), "score": float(res.score[i]),
                   "wen": float(res.wen[i]), "truncated": bool(res.truncated[i])}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    curves = {t: res.term(t) for t in TERMS}
    if fitted is not None and "_oof_decision" in fitted:
        curves["fitted (out-of-fold)"] = fitted["_oof_decision"]
    plot_roc(out / "roc.png", labels, curves, title=f"memreg detect: {model}")
    print(format_table(report))
    print(f"wrote {out / 'scores.jsonl'}, {out / 'report.json'}, {out / 'roc.png'}")
