"""The demo's trade-off picture: copy rate vs held-out loss for every run (issue 9, item 3).

Each run of ``results["runs"]`` is one point ``(heldout_loss, copy rate)`` with its 95% Wilson interval
as a vertical bar; left panel exact captions, right panel paraphrased ones. Lower-left is better:
less copying at no loss of fit. Full fine-tuning and LoRA runs are never compared (different marker
shapes, separate Pareto fronts); the ``penalty`` runs of one mode are joined in order of weight so the
frontier the guard's weight moves along is visible. Pareto-optimal runs get a ring.

Run ``a`` dominates ``b`` (same mode) when ``a.copy <= b.copy`` and ``a.loss <= b.loss`` with one
strict; the Pareto front is the runs no other run dominates (ties: both stay on it). A run with an
undefined (nan) copy rate or loss is neither on the front nor dominates anything.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from memreg.guards.anisotropy_gate.config import AnisotropyGateConfig
from memreg.guards.registry import guard_spec

COPY_KEYS = ("copy_exact", "copy_paraphrase")
COPY_LABELS = ("exact captions", "paraphrased captions")   # what the two copy rates ask with (the default)
MARKERS = {"full": "o", "lora": "s"}   # training mode -> marker shape; other modes: OTHER_MARKER
OTHER_MARKER = "D"
PENALTY = "anisotropy_gate"            # the guard type whose runs at several weights form a line


def _point(run: dict, copy_key: str) -> tuple[float, float]:
    """(held-out loss, copy rate) of one run."""
    return float(run["heldout_loss"]), float(run[copy_key]["rate"])


def pareto_front(runs: dict, mode: str, copy_key: str = "copy_exact") -> list[str]:
    """Names of the runs of ``mode`` that no other run of ``mode`` dominates on (copy rate, loss),
    in the order of ``runs``."""
    pts = {n: _point(r, copy_key) for n, r in runs.items() if r["mode"] == mode}
    pts = {n: p for n, p in pts.items() if not any(math.isnan(v) for v in p)}

    def dominated(p: tuple[float, float]) -> bool:
        return any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts.values())

    return [n for n, p in pts.items() if not dominated(p)]


def penalty_weight(run: dict) -> float:
    """The run's penalty weight: its ``weight`` key, else the guard's default (``AnisotropyGateConfig.weight``)."""
    if run.get("weight") is not None:
        return float(run["weight"])
    return float(AnisotropyGateConfig.weight)


def penalty_line(runs: dict, mode: str) -> list[str]:
    """Names of the ``penalty`` runs of ``mode`` in increasing weight: the frontier the weight moves along."""
    pen = [(penalty_weight(r), n) for n, r in runs.items() if guard_spec(r["guard"]).name == PENALTY and r["mode"] == mode]
    return [n for _, n in sorted(pen)]


def _draw_panel(ax, runs: dict, copy_key: str, colors: dict) -> None:
    for name, r in runs.items():
        x, y = _point(r, copy_key)
        lo, hi = r[copy_key]["ci95"]
        yerr = None if math.isnan(lo) or math.isnan(hi) else [[max(y - lo, 0.0)], [max(hi - y, 0.0)]]
        ax.errorbar([x], [y], yerr=yerr, fmt=MARKERS.get(r["mode"], OTHER_MARKER), color=colors[r["guard"]],
                    ms=7, capsize=3, lw=1, zorder=3)
        ax.annotate(name, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7)
    for mode in dict.fromkeys(r["mode"] for r in runs.values()):
        names = penalty_line(runs, mode)
        line = [_point(runs[n], copy_key) for n in names]
        if len(line) > 1:
            ax.plot([p[0] for p in line], [p[1] for p in line], "-", color=colors[runs[names[0]]["guard"]], lw=1,
                    alpha=0.7, zorder=2)
        front = [_point(runs[n], copy_key) for n in pareto_front(runs, mode, copy_key)]
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=260, facecolors="none", edgecolors="black",
                   linewidths=1.2, zorder=4)
    ax.set_xlabel("held-out loss (lower is better)")
    ax.set_ylabel("copy rate (lower is better)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)


def _legend_handles(runs: dict, colors: dict) -> tuple[list, list[str]]:
    handles, labels = [], []
    for guard, c in colors.items():
        handles.append(Line2D([], [], color=c, marker="o", ls="none"))
        labels.append(f"guard {guard}")
    for mode in dict.fromkeys(r["mode"] for r in runs.values()):
        handles.append(Line2D([], [], color="gray", marker=MARKERS.get(mode, OTHER_MARKER), ls="none"))
        labels.append(f"{mode} fine-tuning")
    handles.append(Line2D([], [], color=colors.get(PENALTY, "gray"), lw=1))
    labels.append("penalty by weight")
    handles.append(Line2D([], [], marker="o", ms=12, mfc="none", mec="black", ls="none"))
    labels.append("Pareto-optimal (per mode)")
    return handles, labels


def plot_tradeoff(runs: dict, path: Path, labels: tuple[str, str] = COPY_LABELS) -> Path:
    """Two panels (``labels``: exact, paraphrased captions by default): copy rate with 95% CI vs
    held-out loss per run; PNG at ``path``."""
    if not runs:
        raise ValueError("plot_tradeoff: no runs to plot")
    cmap = colormaps["tab10"]
    colors = {g: cmap(i % 10) for i, g in enumerate(dict.fromkeys(r["guard"] for r in runs.values()))}
    fig = Figure(figsize=(11, 5.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for ax, key, label in zip(axes, COPY_KEYS, labels):
        _draw_panel(ax, runs, key, colors)
        ax.set_title(f"copy rate on {label}", fontsize=10)
    fig.suptitle("Memorization vs fit: lower-left is better (bars: 95% Wilson CI; ring: Pareto-optimal)",
                 fontsize=11)
    handles, names = _legend_handles(runs, colors)
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(str(path), dpi=100)
    return path
