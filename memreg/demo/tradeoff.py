"""The demo's trade-off picture: copy rate vs held-out loss for every run (issue 9, item 3).

Each run of ``results["runs"]`` is one point ``(heldout_loss, copy rate)`` with its 95% Wilson interval
as a vertical bar; left panel exact captions, right panel paraphrased ones. Lower-left is better:
less copying at no loss of fit. Full fine-tuning and LoRA runs are never compared (different marker
shapes, separate Pareto fronts); the ``penalty`` runs of one mode are joined in order of weight so the
frontier the guard's weight moves along is visible. Pareto-optimal runs get a ring. Each run has
the colour the report gives it (``colors``, :func:`memreg.report.run_colors`). The x-axis spans the
held-out losses up to ``OFF_SCALE`` times the lowest one; a run beyond it is pinned at the right edge
as a ``>`` with its loss in its label, so one broken run cannot squeeze every other point into a corner.

Run ``a`` dominates ``b`` (same mode) when ``a.copy <= b.copy`` and ``a.loss <= b.loss`` with one
strict; the Pareto front is the runs no other run dominates (ties: both stay on it). A run with an
undefined (nan) copy rate or loss is neither on the front nor dominates anything.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from memreg.guards.anisotropy_gate.config import AnisotropyGateConfig
from memreg.guards.registry import guard_spec
from memreg.report import run_colors

COPY_KEYS = ("copy_exact", "copy_paraphrase")
MARKERS = {"full": "o", "lora": "s"}   # training mode -> marker shape; other modes: OTHER_MARKER
OTHER_MARKER = "D"
OFF_SCALE_MARKER = ">"
OFF_SCALE = 1.5                        # x-axis up to this multiple of the lowest held-out loss
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


def x_range(runs: dict, off_scale: float = OFF_SCALE) -> tuple[float, float]:
    """(left, right) of the loss axis: the finite losses up to ``off_scale`` x the lowest, with a 5% margin."""
    xs = [float(r["heldout_loss"]) for r in runs.values() if math.isfinite(float(r["heldout_loss"]))]
    if not xs:
        return 0.0, 1.0
    lo = min(xs)
    hi = max(x for x in xs if x <= lo * off_scale) if lo > 0 else max(xs)
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(lo) or 0.05
    return lo - pad, hi + pad


LABEL_STEP = 10     # points a crowded label is lifted per neighbour
LABEL_LEVELS = 4    # lifts cycle after this many


def label_lifts(points: dict[str, tuple[float, float]], width: float, near: float = 0.12) -> dict[str, int]:
    """Label offsets (points upward) so that the names of runs at about the same copy rate (within
    0.03) and within ``near`` of the axis width of each other do not print over one another: in
    order of loss, each such run one :data:`LABEL_STEP` above the previous, cycling after
    :data:`LABEL_LEVELS`."""
    lifts: dict[str, int] = {}
    placed: list[tuple[float, float, int]] = []
    for name, (x, y) in sorted(points.items(), key=lambda kv: (round(kv[1][1], 2), kv[1][0])):
        level = 0
        for px, py, lv in reversed(placed):
            if abs(py - y) <= 0.03 and abs(px - x) <= near * max(width, 1e-12):
                level = (lv + 1) % LABEL_LEVELS
                break
        placed.append((x, y, level))
        lifts[name] = level * LABEL_STEP
    return lifts


def _draw_panel(ax, runs: dict, copy_key: str, colors: dict, left: float, right: float) -> None:
    def shown(r: dict) -> tuple[float, float]:
        x, y = _point(r, copy_key)
        return (min(x, right), y)

    lifts = label_lifts({n: shown(r) for n, r in runs.items()}, right - left)
    for name, r in runs.items():
        (x, y), loss = shown(r), float(r["heldout_loss"])
        off = loss > right
        lo, hi = r[copy_key]["ci95"]
        yerr = None if math.isnan(lo) or math.isnan(hi) else [[max(y - lo, 0.0)], [max(hi - y, 0.0)]]
        ax.errorbar([x], [y], yerr=yerr, fmt=OFF_SCALE_MARKER if off else MARKERS.get(r["mode"], OTHER_MARKER),
                    color=colors[name], ms=7, capsize=3, lw=1, zorder=3)
        label = f"{name} (loss {loss:.3g}, off the scale)" if off else name
        ax.annotate(label, (x, y), xytext=(-5 if off else 5, 4 + lifts[name]), textcoords="offset points", fontsize=7,
                    ha="right" if off else "left", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"}
                    if lifts[name] else None)
    for mode in dict.fromkeys(r["mode"] for r in runs.values()):
        names = penalty_line(runs, mode)
        line = [shown(runs[n]) for n in names]
        if len(line) > 1:
            ax.plot([p[0] for p in line], [p[1] for p in line], "-", color="gray", lw=1, alpha=0.7, zorder=2)
        front = [shown(runs[n]) for n in pareto_front(runs, mode, copy_key)]
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=260, facecolors="none", edgecolors="black",
                   linewidths=1.2, zorder=4)
    ax.set_xlabel("held-out loss (lower is better)")
    ax.set_ylabel("copy rate (lower is better)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)


def _legend_handles(runs: dict) -> tuple[list, list[str]]:
    handles, labels = [], []
    for mode in dict.fromkeys(r["mode"] for r in runs.values()):
        handles.append(Line2D([], [], color="gray", marker=MARKERS.get(mode, OTHER_MARKER), ls="none"))
        labels.append(f"{mode} fine-tuning")
    handles.append(Line2D([], [], color="gray", lw=1))
    labels.append("penalty by weight (colours: the report's runs)")
    handles.append(Line2D([], [], marker="o", ms=12, mfc="none", mec="black", ls="none"))
    labels.append("Pareto-optimal (per mode)")
    return handles, labels


def plot_tradeoff(runs: dict, path: Path, labels: tuple[str, str], colors: dict[str, str] | None = None) -> Path:
    """Two panels, copy rate with 95% CI vs held-out loss per run; PNG at ``path``. ``labels``: what the
    two copy rates ask with (the world's ``memreg.demo.run.COPY_LABELS``); ``colors``: run name ->
    colour (default: the report's colours for these runs in this order)."""
    if not runs:
        raise ValueError("plot_tradeoff: no runs to plot")
    colors = colors or run_colors(list(runs))
    missing = set(runs) - set(colors)
    if missing:
        raise ValueError(f"plot_tradeoff: no colour for run(s) {sorted(missing)}")
    left, right = x_range(runs)
    fig = Figure(figsize=(11, 5.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for ax, key, label in zip(axes, COPY_KEYS, labels):
        _draw_panel(ax, runs, key, colors, left, right)
        ax.set_xlim(left, right)
        ax.set_title(f"copy rate on {label}", fontsize=10)
    fig.suptitle("Memorization vs fit: lower-left is better (bars: 95% Wilson CI; ring: Pareto-optimal)",
                 fontsize=11)
    handles, names = _legend_handles(runs)
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(str(path), dpi=100)
    return path
