"""Detection of memorized prompts: the library behind ``memreg detect`` (:mod:`memreg.commands.detect`).

``score_prompts`` (``memreg.score.score_prompts`` plus Wen's baseline, truncation and timing; also
used by ``scripts/bench_score.py``), ``fit_weights``, ``merge_parts`` (the shards of a sharded run,
in prompt order), ``build_report``, ``write_outputs``, ``plot_roc`` and ``format_table``. Flags, their
checks and the run's wiring are the command's; nothing here defines or checks flags.

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

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memreg.errors import MemregError
from memreg.log_tags import SCORE_TERMS
from memreg.metrics import DEFAULT_FPRS, auroc, detection_metrics, fpr_key, roc_points
from memreg.score import NOISE_MODES, AnisotropyScore, ddim_timesteps, mean_scores, wen_multistep_norm
from memreg.sharding import busiest_seconds, read_part, shard_ranges

OUTPUT_FILES = ("scores.jsonl", "report.json", "roc.png")
DETECT_TERMS = SCORE_TERMS + ("wen",)   # the score's terms and Wen et al.'s baseline
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
    mean = mean_scores(scorer, encoder, prompts, seeds, noise=noise, batch_size=batch_size, share_uncond=share_uncond,
                       encode=encode, on_batch=on_batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    k = len(seeds)
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
    # imported here: scikit-learn is slow to import and only --fit-weights needs it, not the
    # scoring that the monitor and the benchmarks import this module for
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
# Sharded scoring: the parts of several processes (or one, resumable) merged
# --------------------------------------------------------------------------------------------

def merge_parts(parts: Path, n: int, shard_size: int) -> ScoredPrompts:
    """The :class:`ScoredPrompts` of all ``n`` prompts from the finished parts, in prompt order;
    ``seconds`` is the busiest process's scoring time."""
    terms = {t: np.full(n, np.nan) for t in DETECT_TERMS}
    truncated, reused, has_wen = [False] * n, True, True
    num = len(shard_ranges(n, shard_size))
    for k in range(num):
        head, items = read_part(parts, k)
        reused &= bool(head["wen_reused_norm"])
        for x in items:
            has_wen &= x["wen"] is not None
            for t in DETECT_TERMS:
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
    # imported here, as scikit-learn in fit_weights: only a run's outputs need matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    for t in DETECT_TERMS:
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


def build_report(args, mem, nonmem, res, scorer, encoder, metrics, fitted, preset, seeds, dtype, device,
                 load_s: float, versions: dict) -> dict:
    """``report.json``: settings, data counts, metrics, fitted weights, timing and ``versions``.

    ``args``: the run's settings as ``memreg detect`` parses them (model, revision, variant, noise,
    batch_size, space, wen_steps, fit_weights, cv_folds); ``mem``/``nonmem``: the two
    :class:`memreg.prompt_io.PromptList`."""
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
        "versions": versions,
    }


def write_outputs(out: Path, prompts: list[str], labels, res, fitted, report: dict, model: str) -> None:
    """``scores.jsonl``, ``report.json`` and ``roc.png`` in ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "scores.jsonl").open("w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            row = {"prompt": p, "label": int(labels[i]), "norm": float(res.norm[i]),
                   "align": float(res.align[i]), "score": float(res.score[i]),
                   "wen": float(res.wen[i]), "truncated": bool(res.truncated[i])}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    curves = {t: res.term(t) for t in DETECT_TERMS}
    if fitted is not None and "_oof_decision" in fitted:
        curves["fitted (out-of-fold)"] = fitted["_oof_decision"]
    plot_roc(out / "roc.png", labels, curves, title=f"memreg detect: {model}")
