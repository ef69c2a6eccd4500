"""TensorBoard tag names shared by the writers (monitor, training loop, guards) and the reader (report).

One place for the string contract: every ``train/``, ``perf/``, ``guard/``, ``eval/`` and ``copy/``
tag is a constant or a constructor here, and writers and readers use only these, so a renamed tag
changes in one place and the report (which looks tags up exactly) cannot drift from the writers.
``eval_stat("duplicated", "score", "mean")`` is the tag the monitor writes and the report plots. A
``"{}"`` argument gives the pattern the report uses to find which groups/contrasts a run logged
(``eval_stat("{}", "score", "mean")`` -> ``"eval/{}/score_mean"``).
"""

from __future__ import annotations

SCORE_TERMS = ("norm", "align", "score")   # the anisotropy score's terms, as tags, reports and score outputs name them

# detection eval (memreg.monitor)
EVAL_SECONDS = "eval/seconds"
EVAL_ROC = "eval/roc"
EVAL_TOP_K = "eval/top_k_captions"
# copy check
COPY_THRESHOLD = "copy/threshold"
COPY_SECONDS = "copy/seconds"
# training loop (memreg.training.loop)
TRAIN_LOSS_MSE = "train/loss_mse"                # denoising loss of the step
TRAIN_LOSS = "train/loss"                        # denoising loss plus the guard's weighted penalty
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"              # pre-clip gradient norm
PERF_STEP_TIME = "perf/step_time_s"
PERF_SAMPLES_PER_S = "perf/samples_per_s"
PERF_PEAK_MEM_MB = "perf/peak_mem_mb"
PERF_ACTIVATION_MB = "perf/activation_mb"        # peak activation memory (activation meter on)
# every name the report reads the loss and the step time under, first logged wins: runs whose
# event files name the quantity without its prefix or unit still plot
TRAIN_LOSS_MSE_NAMES = (TRAIN_LOSS_MSE, "loss_mse")
PERF_STEP_TIME_NAMES = (PERF_STEP_TIME, "train/step_time")


def eval_stat(group: str, term: str, stat: str) -> str:
    """``eval/<group>/<term>_<stat>``: stat of a score term (norm, align, score) over a prompt group."""
    return f"eval/{group}/{term}_{stat}"


def eval_count(group: str) -> str:
    return f"eval/{group}/n_prompts"


def eval_auc(contrast: str, term: str) -> str:
    """``eval/auc/<a>_vs_<b>/<term>``."""
    return f"eval/auc/{contrast}/{term}"


def eval_tpr(contrast: str, term: str) -> str:
    """``eval/tpr_at_1pct_fpr/<a>_vs_<b>/<term>``."""
    return f"eval/tpr_at_1pct_fpr/{contrast}/{term}"


def eval_hist(group: str, term: str) -> str:
    return f"eval_hist/{group}/{term}"


def copy_stat(group: str, name: str) -> str:
    """``copy/<group>/<name>`` (memorized_frac, sim_mean, sim_p95, own_sim_mean, own_sim_p95, own_memorized_frac)."""
    return f"copy/{group}/{name}"


def copy_hist(group: str) -> str:
    return f"copy_hist/{group}/similarity"


def copy_grid(group: str) -> str:
    return f"copy_grid/{group}"


# guard (memreg.guards)
GUARD_PENALTY = "guard/penalty"                  # mean penalty over this step's probes
GUARD_WEIGHTED_PENALTY = "guard/weighted_penalty"  # the penalty as added to the loss (weight, force ratio)
GUARD_TAU = "guard/tau"
GUARD_PROBE_SCORE_MEAN = "guard/probe_score_mean"
GUARD_PROBE_SCORE_P95 = "guard/probe_score_p95"
GUARD_FRAC_OVER_TAU = "guard/frac_over_tau"
GUARD_FORCE_RATIO = "guard/force_ratio"
GUARD_ANCHOR = "guard/anchor"                    # penalty anchor: mean squared distance of the anchored rows' predictions from the base's
GUARD_ANCHOR_ROWS = "guard/anchor_rows"          # penalty anchor: share of this step's rows anchored to the base model
GUARD_AGC_KEPT_FRAC = "guard/agc_kept_frac"      # memreg.guards.agc
GUARD_WEN_TAU = "guard/wen_tau"                  # memreg.guards.wen_filter
GUARD_WEN_SKIPPED_STEPS = "guard/wen_skipped_steps"
GUARD_WEN_KEPT_FRAC = "guard/wen_kept_frac"
GUARD_COND_RATIO = "guard/cond_ratio"
GUARD_THRESHOLD = "guard/threshold"              # reference modes: the threshold on the penalised quantity
GUARD_GROWTH_MEAN = "guard/probe_growth_mean"    # reference modes: mean probe value minus its base value
FIRE_GROUPS = ("duplicated", "ordinary")
GUARD_GATE_FLAGGED = "guard/gate_flagged"        # captions the gate currently leaves out of the denoising loss


def guard_fire_rate(group: str) -> str:
    """``guard/fire_rate/<group>``: fraction of this step's probes of ``group`` (duplicated, ordinary)
    over the penalty's threshold."""
    return f"guard/fire_rate/{group}"


def guard_gate_rate(group: str) -> str:
    """``guard/gate_rate/<group>``: fraction of this step's training samples of ``group`` the gate
    left out of the denoising loss."""
    return f"guard/gate_rate/{group}"


def guard_final(name: str) -> str:
    """``guard/<name>``: an entry of the guard's end-of-run report (``Guard.finish``), logged once."""
    return f"guard/{name}"
