"""A static HTML summary of training/monitoring runs, from their TensorBoard event files.

Reads the TensorBoard event files under each run directory (recursively, with tensorboard's
``EventAccumulator``; no second logging format) and writes one HTML page with PNG plots in a
``<name>_files/`` folder beside it (no server, no JavaScript): the sections of :data:`SECTIONS`
(detection score per prompt group over steps, AUC, memorized fraction of the copy check, guard
selectivity, training loss, step time), a table of the latest values (:data:`SUMMARY_ROWS`), the
latest image grids and top-k caption table. Several runs are compared side by side (one line colour
/ one column per run). The ``memreg report`` command is :mod:`memreg.commands.report`.

Every tag read here is built by :mod:`memreg.log_tags`, the module the writers use, and is looked
up exactly: a tag the writers rename shows up as "not logged" instead of silently matching another.
"""

from __future__ import annotations

import html
import io
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util

from memreg import log_tags
from memreg.errors import MemregError

EVENT_GLOB = "events.out.tfevents.*"
MARKER = ".memreg-report"
TERM_STYLES = {"score": "-", "norm": "--", "align": ":"}

Tag = str | tuple[str, ...]
"""A tag, or the tags one quantity is logged under (the first the run logged is read)."""


class ReportError(MemregError, ValueError):
    """Bad report input; the message says which path and why."""


@dataclass
class RunData:
    path: Path
    name: str = ""
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)         # tag -> step -> value
    images: dict[str, tuple[int, float, bytes]] = field(default_factory=dict)  # tag -> latest (step, wall, png)
    texts: dict[str, tuple[int, float, str]] = field(default_factory=dict)     # tag -> latest (step, wall, text)
    event_files: list[Path] = field(default_factory=list)

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        d = self.scalars.get(tag, {})
        steps = sorted(d)
        return steps, [d[s] for s in steps]

    def logged(self, tags: Tag) -> list[str]:
        """Which of ``tags`` (one tag or several names of one quantity) this run logged, in that order."""
        return [t for t in ((tags,) if isinstance(tags, str) else tags) if self.scalars.get(t)]

    def resolve(self, tags: Tag) -> str:
        """The tag to read ``tags`` from: the first this run logged (else the first, which reads as empty)."""
        found = self.logged(tags)
        return found[0] if found else ((tags,) if isinstance(tags, str) else tags)[0]

    def latest(self, tag: str) -> float | None:
        d = self.scalars.get(tag)
        return d[max(d)] if d else None

    def median(self, tag: str) -> float | None:
        """The median over steps (the upper one of an even count)."""
        vals = sorted(self.scalars.get(tag, {}).values())
        return vals[len(vals) // 2] if vals else None


def find_event_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob(EVENT_GLOB) if p.is_file())


def load_run(run_dir: str | Path) -> RunData:
    """All scalars, the latest image and text of each tag, from every event file under ``run_dir``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"RUN_DIR {str(run_dir)!r} is not a directory")
    files = find_event_files(run_dir)
    if not files:
        raise ReportError(f"RUN_DIR {str(run_dir)!r} has no TensorBoard event files ({EVENT_GLOB}) under it")
    run = RunData(run_dir, event_files=files)
    guidance = {ea.SCALARS: 0, ea.IMAGES: 4, ea.TENSORS: 4, ea.HISTOGRAMS: 1, ea.COMPRESSED_HISTOGRAMS: 1,
                ea.AUDIO: 1}
    wall: dict[tuple[str, int], float] = {}
    for d in sorted({f.parent for f in files}):
        acc = ea.EventAccumulator(str(d), size_guidance=guidance)
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get(ea.SCALARS, []):
            for ev in acc.Scalars(tag):
                key = (tag, ev.step)
                if key not in wall or ev.wall_time >= wall[key]:  # a rerun of a step (resume) wins
                    wall[key] = ev.wall_time
                    run.scalars.setdefault(tag, {})[ev.step] = float(ev.value)
        for tag in tags.get(ea.IMAGES, []):
            for ev in acc.Images(tag):
                cur = run.images.get(tag)
                if cur is None or (ev.step, ev.wall_time) >= cur[:2]:
                    run.images[tag] = (ev.step, ev.wall_time, ev.encoded_image_string)
        for tag in tags.get(ea.TENSORS, []):
            if not tag.endswith("/text_summary"):
                continue
            for ev in acc.Tensors(tag):
                cur = run.texts.get(tag)
                if cur is None or (ev.step, ev.wall_time) >= cur[:2]:
                    arr = tensor_util.make_ndarray(ev.tensor_proto)
                    val = arr.item() if arr.size == 1 else b"\n".join(arr.ravel().tolist())
                    text = val.decode("utf-8", "replace") if isinstance(val, bytes) else str(val)
                    run.texts[tag[:-len("/text_summary")]] = (ev.step, ev.wall_time, text)
    return run


def name_runs(runs: list[RunData]) -> None:
    """Give each run a display name: its directory name, or where those clash the fewest trailing path
    parts that tell the clashing runs apart (``a/runs/none``, ``b/runs/none`` -> ``a/runs/none``,
    ``b/runs/none``; ``x/none``, ``y/none`` -> ``x/none``, ``y/none``), numbered where still equal (the
    same directory twice)."""
    parts = [r.path.resolve().parts or (str(r.path),) for r in runs]
    for i, r in enumerate(runs):
        others = {p for p in parts if p[-1:] == parts[i][-1:] and p != parts[i]}
        k = 1
        while k < len(parts[i]) and any(p[-k:] == parts[i][-k:] for p in others):
            k += 1
        r.name = "/".join(parts[i][-k:]) or str(r.path)
    seen: dict[str, int] = {}
    for r in runs:  # still equal (same dir twice): number them
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name} ({seen[r.name]})"
        else:
            seen[r.name] = 1


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# ---------------------------------------------------------------------- plots
STYLE_NAMES = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}


def _figure(n_panels: int):
    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(4.6 * cols, 3.3 * rows + 0.6), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, k + 1) for k in range(n_panels)]


def _save(fig, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(str(path), dpi=90)


def _colors(n: int) -> list:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def run_colors(names: list[str]) -> dict[str, str]:
    """name -> the hex colour the report gives that run when its runs come in this order (other
    figures of the same runs, e.g. the demo's trade-off plot, use it to match the report)."""
    return {n: _hex(c) for n, c in zip(names, _colors(len(names)))}


def _hex(color) -> str:
    return to_hex(color)


def _groups_with(runs: list[RunData], pattern: str) -> list[str]:
    """Middle parts ``X`` of tags matching ``pattern`` = 'prefix/{}/suffix', in first-seen order."""
    rx = re.compile("^" + re.escape(pattern).replace(r"\{\}", "([^/]+)") + "$")
    out: dict[str, None] = {}
    for r in runs:
        for tag in r.scalars:
            m = rx.match(tag)
            if m:
                out[m.group(1)] = None
    return list(out)


@dataclass
class Legend:
    """What a plot's legend says: one entry per run (its colour) and one per line style."""

    runs: list[tuple[str, str]]      # (run name, hex colour)
    styles: list[tuple[str, str]]    # (style name, what it shows)
    coincide: list[tuple[str, str]] = field(default_factory=list)  # runs whose curves are identical here

    def labels(self) -> list[str]:
        return [name for name, _ in self.runs] + [f"{st}: {what}" for st, what in self.styles]


def _draw_panel(ax, runs, colors, lines) -> bool:
    """Step series (one colour per run; earlier runs wider and below, so coinciding curves stay
    visible), or grouped bars when no line of the panel has more than one point."""
    series = [[run.series(run.resolve(tag)) for tag, _, _ in lines] for run in runs]
    if max(len(st) for per_run in series for st, _ in per_run) <= 1:
        width = 0.8 / len(runs)
        for k, (per_run, color) in enumerate(zip(series, colors)):
            for j, (st, vals) in enumerate(per_run):
                if st:
                    x = j + (k - (len(runs) - 1) / 2) * width
                    ax.bar(x, vals[0], width, color=color, label=runs[k].name)
                    ax.annotate(f"{vals[0]:.3g}\nstep {st[0]}", (x, vals[0]), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(lines)), [suffix.strip() or "value" for _, _, suffix in lines])
        ax.margins(y=0.25)
        return False
    n = len(runs)
    for k, (per_run, color) in enumerate(zip(series, colors)):
        for (st, vals), (_, style, _) in zip(per_run, lines):
            if st:
                ax.plot(st, vals, style, color=color, label=runs[k].name, lw=1.2 + 3.0 * (n - 1 - k) / max(n - 1, 1), zorder=2 + k,
                        marker="o" if len(st) < 30 else None, ms=3)
    ax.set_xlabel("step")
    return True


def plot_panels(runs: list[RunData], panels: list[tuple[str, list[tuple[Tag, str, str]]]], path: Path,
                ylabel: str) -> Legend | None:
    """One subplot per panel (title, [(tag, linestyle, label suffix)]), one colour per run, and one
    legend for the figure below the panels. Returns the legend (None: nothing logged, no file).

    A ``tag`` may be a tuple of the names one quantity is logged under (:meth:`RunData.resolve`)."""
    panels = [(t, lines) for t, lines in panels
              if any(run.scalars.get(run.resolve(tag)) for run in runs for tag, _, _ in lines)]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    colors = _colors(len(runs))
    drew_lines = False
    for ax, (title, lines) in zip(axes, panels):
        drew_lines |= _draw_panel(ax, runs, colors, lines)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    styles = {style: suffix.strip() for _, lines in panels for _, style, suffix in lines if suffix.strip()}
    logged = [any(run.scalars.get(run.resolve(tag)) for _, lines in panels for tag, _, _ in lines) for run in runs]
    legend = Legend([(r.name + ("" if ok else " (not logged)"), _hex(c)) for r, c, ok in zip(runs, colors, logged)],
                    [(STYLE_NAMES.get(st, st), what) for st, what in styles.items()] if len(styles) > 1 and drew_lines else [])
    data = [[run.series(run.resolve(tag)) for _, lines in panels for tag, _, _ in lines] for run in runs]
    legend.coincide = [(runs[i].name, runs[j].name) for i in range(len(runs)) for j in range(i + 1, len(runs))
                       if logged[i] and data[i] == data[j]]
    handles = [Line2D([], [], color=c, lw=2.5) for c in colors]
    handles += [Line2D([], [], color="black", ls=st, lw=1.2) for st in styles] if legend.styles else []
    fig.legend(handles, legend.labels(), loc="outside lower center", ncol=min(len(handles), 3 * min(len(panels), 3)),
               fontsize=9,
               frameon=False)
    _save(fig, path)
    return legend


# ---------------------------------------------------------------------- what the page shows
@dataclass(frozen=True)
class Curve:
    """One line of a panel: ``tag`` (``"{}"`` stands for the panel's group), its line style, and what
    the style means in the legend (``" mean"``; empty: the style needs no legend entry)."""

    tag: Tag
    style: str = "-"
    label: str = ""


@dataclass(frozen=True)
class Panel:
    """One subplot: its title (``"{}"`` stands for the group) and its curves."""

    title: str
    curves: tuple[Curve, ...]


@dataclass(frozen=True)
class Section:
    """One plot of the page (a heading, one PNG of panels, a note above it).

    ``groups``: a tag pattern (``"{}"`` for the group, as :func:`_groups_with` reads it) whose groups
    the runs logged, or a fixed tuple of groups; ``panels`` are repeated for each group, in order.
    ``None``: ``panels`` once. ``spaced``: underscores of the group are shown as spaces in titles."""

    title: str
    file: str
    ylabel: str
    panels: tuple[Panel, ...]
    groups: str | tuple[str, ...] | None = None
    note: str = ""
    spaced: bool = False


def _terms(tag_of) -> tuple[Curve, ...]:
    """One curve per score term (score, norm, align), told apart by line style."""
    return tuple(Curve(tag_of(t), TERM_STYLES[t], f" {t}") for t in log_tags.SCORE_TERMS)


_GROUP_SCORE = log_tags.eval_stat("{}", "score", "mean")

SECTIONS: list[Section] = [
    Section("Detection score per prompt group", "score_curves.png", "anisotropy score",
            (Panel("{}", (Curve(_GROUP_SCORE, "-", " mean"),
                          Curve(log_tags.eval_stat("{}", "score", "p95"), "--", " p95"))),),
            groups=_GROUP_SCORE, note="solid: mean over the group's prompts; dashed: 95th percentile"),
    Section("Norm and alignment terms per group", "term_curves.png", "mean over prompts",
            tuple(Panel(f"{{}}: {t}", (Curve(log_tags.eval_stat("{}", t, "mean")),)) for t in ("norm", "align")),
            groups=_GROUP_SCORE),
    Section("Detection AUC over steps", "auc_curves.png", "AUC",
            (Panel("{}", _terms(lambda t: log_tags.eval_auc("{}", t))),),
            groups=log_tags.eval_auc("{}", "score"), note="solid: combined score; dashed: norm; dotted: align",
            spaced=True),
    Section("Detection TPR at 1% FPR over steps", "tpr_curves.png", "TPR @ 1% FPR",
            (Panel("{}", _terms(lambda t: log_tags.eval_tpr("{}", t))),),
            groups=log_tags.eval_tpr("{}", "score"), spaced=True),
    Section("Copy check: memorized fraction", "memorized_frac.png", "fraction of generations over the threshold",
            (Panel("{}", (Curve(log_tags.copy_stat("{}", "memorized_frac")),)),),
            groups=log_tags.copy_stat("{}", "memorized_frac")),
    Section("Copy check: 95th-percentile similarity to the nearest training image", "copy_sim_p95.png", "similarity",
            (Panel("{}", (Curve(log_tags.copy_stat("{}", "sim_p95")),)),),
            groups=log_tags.copy_stat("{}", "sim_p95")),
    Section("Guard selectivity: training samples gated and probes fired", "guard_selectivity.png", "share per step",
            (Panel("{}", (Curve(log_tags.guard_gate_rate("{}"), "-", " gated"),
                          Curve(log_tags.guard_fire_rate("{}"), "--", " fired"))),),
            groups=log_tags.FIRE_GROUPS,
            note="solid: the step's training samples the gate left out of the loss; dashed: the step's probes over "
                 "the threshold (penalty guard; groups as the monitor finds duplicates)"),
    Section("Training loss (loss_mse)", "loss.png", "loss",
            (Panel("loss_mse", (Curve(log_tags.TRAIN_LOSS_MSE_NAMES),)),)),
    Section("Step time (step_time)", "step_time.png", "seconds",
            (Panel("step_time", (Curve(log_tags.PERF_STEP_TIME_NAMES),)),)),
]
"""The plots of the page, in order; :func:`build_report` walks this list."""


@dataclass(frozen=True)
class SummaryRow:
    """One row of the "Latest values" table: ``label`` (``"{}"``: the group), the tag read
    (``"{}"``: the group; one row per group the runs logged), and the statistic over steps."""

    label: str
    tag: Tag
    stat: str = "latest"          # "latest" or "median"
    per_group: bool = False
    spaced: bool = False


SUMMARY_ROWS: list[SummaryRow] = [
    SummaryRow("score mean: {} (latest)", _GROUP_SCORE, per_group=True),
    SummaryRow("AUC {}: score (latest)", log_tags.eval_auc("{}", "score"), per_group=True, spaced=True),
    SummaryRow("memorized fraction: {} (latest)", log_tags.copy_stat("{}", "memorized_frac"), per_group=True),
    SummaryRow("loss_mse (latest)", log_tags.TRAIN_LOSS_MSE_NAMES),
    SummaryRow("step_time median (s)", log_tags.PERF_STEP_TIME_NAMES, stat="median"),
    SummaryRow("eval seconds (latest)", log_tags.EVAL_SECONDS),
]
"""The rows of the "Latest values" table after "last step (any scalar)", in order."""


def _fill(tag: Tag, group: str) -> Tag:
    """``tag`` with its ``"{}"`` replaced by ``group``."""
    return tag.replace("{}", group) if isinstance(tag, str) else tuple(t.replace("{}", group) for t in tag)


def _section_groups(runs: list[RunData], groups: str | tuple[str, ...] | None) -> list[str | None]:
    if groups is None:
        return [None]
    return list(groups) if isinstance(groups, tuple) else _groups_with(runs, groups)


def section_panels(runs: list[RunData], section: Section) -> list[tuple[str, list[tuple[Tag, str, str]]]]:
    """The panels of ``section`` for these runs, as :func:`plot_panels` takes them."""
    out = []
    for g in _section_groups(runs, section.groups):
        shown = "" if g is None else (g.replace("_", " ") if section.spaced else g)
        for p in section.panels:
            curves = [(c.tag if g is None else _fill(c.tag, g), c.style, c.label) for c in p.curves]
            out.append((p.title.replace("{}", shown), curves))
    return out


# ---------------------------------------------------------------------- html
def _fmt(v: float | None) -> str:
    if v is None:
        return "&ndash;"
    return f"{v:.4g}"


def _summary_rows(runs: list[RunData]) -> list[tuple[str, list[str]]]:
    """The "Latest values" table: "last step (any scalar)", then :data:`SUMMARY_ROWS` (rows no run logged left out)."""
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn):
        vals = [fn(r) for r in runs]
        if any(v is not None for v in vals):
            rows.append((label, [_fmt(v) for v in vals]))

    add("last step (any scalar)", lambda r: max((max(d) for d in r.scalars.values() if d), default=None))
    for row in SUMMARY_ROWS:
        for g in (_groups_with(runs, row.tag) if row.per_group else [None]):
            tag = row.tag if g is None else _fill(row.tag, g)
            label = row.label if g is None else row.label.replace("{}", g.replace("_", " ") if row.spaced else g)
            add(label, lambda r, tag=tag: getattr(r, row.stat)(r.resolve(tag)))
    return rows


CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1500px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}th{background:#f3f3f3}
img{max-width:100%}h2{margin-top:1.6em;border-bottom:1px solid #ddd}pre{font-size:12px;white-space:pre-wrap}
.note{color:#777}figure{margin:.5em 0}figcaption{font-size:13px;color:#333}
.sw{display:inline-block;width:.9em;height:.9em;margin-right:.35em;vertical-align:-.1em;border-radius:2px}"""


def figure_html(src: str, heading: str, legend: Legend) -> str:
    """The plot with its legend repeated as text: the alt text and a caption name every run."""
    e = html.escape
    alt = f"{heading}. Legend: " + "; ".join(legend.labels())
    runs = " ".join(f"<span class='sw' style='background:{c}'></span>{e(n)}&emsp;" for n, c in legend.runs)
    styles = "; ".join(f"{e(st)}: {e(what)}" for st, what in legend.styles)
    if legend.coincide:
        same = ", ".join(f"{e(a)} = {e(b)}" for a, b in legend.coincide)
        styles += ("; " if styles else "") + (f"identical values: {same} (drawn on top of each other, the earlier run "
                                              "wider and underneath)")
    return (f"<figure><img src='{src}' alt='{e(alt, quote=True)}'><figcaption>{runs}"
            + (f"<br>{styles}" if styles else "") + "</figcaption></figure>")


def build_report(runs: list[RunData], out: Path, title: str = "memreg report",
                 extra_figures: list[tuple[Path, str, str]] | None = None) -> list[Path]:
    """Write ``out`` and its PNGs into ``<out stem>_files/``; returns the PNG paths written.

    ``extra_figures``: ``(png_path, heading, caption)`` made elsewhere (the demo's trade-off plot),
    copied into the assets folder and shown first, after the title."""
    assets = out.parent / f"{out.stem}_files"
    assets.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"]
    parts += _extra_figures_html(extra_figures or [], assets, written)
    if any(not r.name for r in runs) or len({r.name for r in runs}) < len(runs):
        name_runs(runs)  # callers that build RunData themselves (the demo) get names too
    colors = [_hex(c) for c in _colors(len(runs))]

    def swatch(k: int) -> str:
        return f"<span class='sw' style='background:{colors[k]}'></span>{e(runs[k].name)}"

    run_headers = "".join(f"<th>{swatch(k)}</th>" for k in range(len(runs)))
    parts.append("<h2>Runs</h2><p class='note'>each run keeps its colour in every plot</p><table><tr><th>run</th>"
                 "<th>directory</th><th>event files</th></tr>")
    for k, r in enumerate(runs):
        parts.append(f"<tr><td>{swatch(k)}</td><td>{e(str(r.path))}</td><td>{len(r.event_files)}</td></tr>")
    parts.append("</table>")

    rows = _summary_rows(runs)
    if rows:
        parts.append("<h2>Latest values</h2><table><tr><th>metric</th>" + run_headers + "</tr>")
        for label, vals in rows:
            parts.append(f"<tr><td>{e(label)}</td>" + "".join(f"<td>{v}</td>" for v in vals) + "</tr>")
        parts.append("</table>")

    for sec in SECTIONS:
        path = assets / sec.file
        parts.append(f"<h2>{e(sec.title)}</h2>")
        legend = plot_panels(runs, section_panels(runs, sec), path, sec.ylabel)
        if legend is None:
            parts.append("<p class='note'>not logged in these runs</p>")
            continue
        written.append(path)
        if sec.note:
            parts.append(f"<p class='note'>{e(sec.note)}</p>")
        parts.append(figure_html(f"{e(assets.name)}/{e(sec.file)}", sec.title, legend))

    parts += _latest_media_html(runs, run_headers, assets, written)
    parts.append("</body></html>")
    out.write_text("\n".join(parts), encoding="utf-8")
    (assets / MARKER).write_text("\n".join(p.name for p in written) + "\n")
    return written


def _extra_figures_html(figures: list[tuple[Path, str, str]], assets: Path, written: list[Path]) -> list[str]:
    """Each ``(png_path, heading, caption)`` copied to ``assets`` (added to ``written``) as a figure."""
    e = html.escape
    for png, _, _ in figures:
        if not Path(png).is_file():
            raise ReportError(f"extra figure {str(png)!r} is not a file")
    parts: list[str] = []
    for k, (png, heading, caption) in enumerate(figures):
        fname = f"extra{k}_{_slug(Path(png).name)}"
        shutil.copyfile(png, assets / fname)
        written.append(assets / fname)
        parts.append(f"<h2>{e(heading)}</h2><figure><img src='{e(assets.name)}/{e(fname)}' "
                     f"alt='{e(f'{heading}. {caption}', quote=True)}'><figcaption>{e(caption)}</figcaption></figure>")
    return parts


def _latest_media_html(runs: list[RunData], run_headers: str, assets: Path, written: list[Path]) -> list[str]:
    """The "Latest images" table (one column per run; PNGs written to ``assets`` and added to
    ``written``) and the latest text of every run."""
    e = html.escape
    parts: list[str] = []
    image_tags = sorted({t for r in runs for t in r.images})
    parts.append("<h2>Latest images</h2>")
    if image_tags:
        parts.append("<table><tr><th>tag</th>" + run_headers + "</tr>")
        for tag in image_tags:
            cells = []
            for k, r in enumerate(runs):
                if tag not in r.images:
                    cells.append("<td class='note'>&ndash;</td>")
                    continue
                step, _, data = r.images[tag]
                fname = f"run{k}_{_slug(tag)}.png"
                _write_png(data, assets / fname)
                written.append(assets / fname)
                cells.append(f"<td>step {step}<br><img src='{e(assets.name)}/{e(fname)}' alt='{e(tag)}'></td>")
            parts.append(f"<tr><td>{e(tag)}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='note'>no images logged in these runs</p>")

    text_tags = sorted({t for r in runs for t in r.texts})
    if text_tags:
        parts.append("<h2>Latest text</h2>")
        for tag in text_tags:
            parts.append(f"<h3>{e(tag)}</h3>")
            for r in runs:
                if tag in r.texts:
                    step, _, text = r.texts[tag]
                    parts.append(f"<p><b>{e(r.name)}</b> (step {step})</p><pre>{e(text)}</pre>")
    return parts


def _write_png(data: bytes, path: Path) -> None:
    """Save an encoded TensorBoard image as PNG (re-encoded if it is another format)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        path.write_bytes(data)
    else:
        Image.open(io.BytesIO(data)).save(path, format="PNG")
