"""TensorBoard tag names shared by the writers (monitor, training loop) and the reader (report).

One place for the string contract: ``eval_stat("duplicated", "score", "mean")`` is the tag the
monitor writes and the report plots. A ``"{}"`` argument gives the pattern the report uses to find
which groups/contrasts a run logged (``eval_stat("{}", "score", "mean")`` -> ``"eval/{}/score_mean"``).
"""

from __future__ import annotations

# detection eval (memreg.monitor)
EVAL_SECONDS = "eval/seconds"
EVAL_ROC = "eval/roc"
EVAL_TOP_K = "eval/top_k_captions"
# copy check
COPY_THRESHOLD = "copy/threshold"
COPY_SECONDS = "copy/seconds"
# training loop
TRAIN_LOSS_MSE = "train/loss_mse"
TRAIN_LR = "train/lr"
STEP_TIME = "perf/step_time_s"


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
