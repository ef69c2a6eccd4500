"""Detection metrics: AUROC, ROC points and TPR at a fixed FPR (two conventions).

Labels are 1 for memorized (positive) and 0 for non-memorized prompts; higher scores mean "more
memorized". Everything is computed with scikit-learn's ``roc_auc_score`` / ``roc_curve``; ties in
the scores count half (AUC) and produce a single diagonal ROC step.

Two conventions for "TPR at x% FPR":

* ``tpr_at_fpr`` (the default in reports): the largest TPR among ROC points whose FPR does not
  exceed ``x`` -- a threshold that an operator could actually pick under an FPR budget of ``x``.
* ``tpr_at_fpr_closest``: the TPR of the ROC point whose FPR is *closest* to ``x`` (first such point
  in ``roc_curve`` order on a tie of distances), on scikit-learn's default ``drop_intermediate=True``
  curve. This is what the paper's released evaluation code (arXiv 2601.20642) reports, so use it
  to compare with the paper's tables; it can pick a point with FPR above ``x``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_FPRS = (0.01, 0.03)


def _as_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("labels must be 0 (non-memorized) or 1 (memorized)")
    if y.min(initial=1) == y.max(initial=0):
        raise ValueError("ROC metrics need both labels (at least one positive and one negative)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    return y, s


def auroc(labels, scores) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); tied pairs count 1/2."""
    from sklearn.metrics import roc_auc_score

    y, s = _as_arrays(labels, scores)
    return float(roc_auc_score(y, s))


def roc_points(labels, scores, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of ``sklearn.metrics.roc_curve``, starting at (0, 0)."""
    from sklearn.metrics import roc_curve

    y, s = _as_arrays(labels, scores)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=drop_intermediate)
    return fpr, tpr, thr


def tpr_at_fpr(labels, scores, max_fpr: float) -> float:
    """Largest TPR over ROC points with FPR <= ``max_fpr`` (the point (0, 0) always qualifies)."""
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    fpr, tpr, _ = roc_points(labels, scores, drop_intermediate=False)
    # A tiny slack so that e.g. 3/100 counts as <= 0.03 despite float rounding.
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max())


def tpr_at_fpr_closest(labels, scores, target_fpr: float) -> float:
    """TPR of the ROC point whose FPR is closest to ``target_fpr`` (the paper's released code).

    ``np.argmin(|fpr - target|)`` on ``roc_curve``'s default (``drop_intermediate=True``) points:
    the first point in curve order wins a tie of distances, so on a vertical ROC segment it is the
    lowest TPR at that FPR. May use a point whose FPR exceeds the target.
    """
    fpr, tpr, _ = roc_points(labels, scores, drop_intermediate=True)
    return float(tpr[int(np.argmin(np.abs(fpr - target_fpr)))])


@dataclass
class DetectionMetrics:
    auc: float
    tpr_at_fpr: dict[str, float]          # {"1%": ..., "3%": ...}, largest TPR with FPR <= x
    tpr_at_fpr_closest: dict[str, float]  # paper convention: point with FPR closest to x

    def to_dict(self) -> dict:
        return asdict(self)


def fpr_key(x: float) -> str:
    """0.01 -> "1%", 0.005 -> "0.5%"."""
    return f"{100 * x:g}%"


def detection_metrics(labels, scores, fprs=DEFAULT_FPRS) -> DetectionMetrics:
    """AUC plus TPR at each FPR in ``fprs`` under both conventions."""
    return DetectionMetrics(
        auc=auroc(labels, scores),
        tpr_at_fpr={fpr_key(x): tpr_at_fpr(labels, scores, x) for x in fprs},
        tpr_at_fpr_closest={fpr_key(x): tpr_at_fpr_closest(labels, scores, x) for x in fprs},
    )
