"""``memreg report RUN_DIR [RUN_DIR ...] --out report.html``: a static HTML summary of runs.

Reads the TensorBoard event files under each RUN_DIR (recursively, with tensorboard's
``EventAccumulator``; no second logging format) and writes one HTML page with PNG plots in a
``<name>_files/`` folder beside it (no server, no JavaScript): detection score per prompt group over
steps, AUC over steps, memorized fraction of the copy check, training loss (``loss_mse``), step time
(``step_time``), a table of the latest values, the latest image grids and top-k caption table.
Several RUN_DIRs are compared side by side (one line colour / one column per run).

Exit status: 0 on success, 2 on bad input (a RUN_DIR that is missing or has no event files, an
existing report without ``--overwrite``).
"""

from __future__ import annotations

import argparse
import html
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from memreg import log_tags
from memreg.errors import MemregError

EVENT_GLOB = "events.out.tfevents.*"
MARKER = ".memreg-report"
TERMS = ("norm", "align", "score")
TERM_STYLES = {"score": "-", "norm": "--", "align": ":"}


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

    def tags_ending(self, name: str) -> list[str]:
        """Tags whose last component is ``name`` or ``name_<unit>`` (``train/loss_mse``, ``perf/step_time_s``)."""
        def match(tag: str) -> bool:
            leaf = tag.rsplit("/", 1)[-1]
            return leaf == name or leaf.startswith(name + "_")
        return sorted(t for t in self.scalars if match(t))

    def latest(self, tag: str) -> float | None:
        d = self.scalars.get(tag)
        return d[max(d)] if d else None


def find_event_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob(EVENT_GLOB) if p.is_file())


def load_run(run_dir: str | Path) -> RunData:
    """All scalars, the latest image and text of each tag, from every event file under ``run_dir``."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

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


def _name_runs(runs: list[RunData]) -> None:
    names = [r.path.resolve().name or str(r.path) for r in runs]
    for i, r in enumerate(runs):
        if names.count(names[i]) > 1:
            parts = r.path.resolve().parts
            r.name = "/".join(parts[-2:]) if len(parts) >= 2 else str(r.path)
        else:
            r.name = names[i]
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
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(4.6 * cols, 3.3 * rows + 0.6), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, k + 1) for k in range(n_panels)]


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(str(path), dpi=90)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _hex(color) -> str:
    from matplotlib.colors import to_hex

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


def _draw_panel(ax, runs, colors, lines, resolve) -> bool:
    """Step series (one colour per run; earlier runs wider and below, so coinciding curves stay
    visible), or grouped bars when no line of the panel has more than one point."""
    series = [[run.series(resolve(tag, run)) for tag, _, _ in lines] for run in runs]
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


def plot_panels(runs: list[RunData], panels: list[tuple[str, list[tuple[str, str, str]]]], path: Path,
                ylabel: str) -> Legend | None:
    """One subplot per panel (title, [(tag, linestyle, label suffix)]), one colour per run, and one
    legend for the figure below the panels. Returns the legend (None: nothing logged, no file).

    A ``tag`` may be a function of the run (runs that name the same quantity differently)."""
    from matplotlib.lines import Line2D

    def resolve(tag, run):
        return tag(run) if callable(tag) else tag

    panels = [(t, lines) for t, lines in panels
              if any(run.scalars.get(resolve(tag, run)) for run in runs for tag, _, _ in lines)]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    colors = _colors(len(runs))
    drew_lines = False
    for ax, (title, lines) in zip(axes, panels):
        drew_lines |= _draw_panel(ax, runs, colors, lines, resolve)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    styles = {style: suffix.strip() for _, lines in panels for _, style, suffix in lines if suffix.strip()}
    logged = [any(run.scalars.get(resolve(tag, run)) for _, lines in panels for tag, _, _ in lines) for run in runs]
    legend = Legend([(r.name + ("" if ok else " (not logged)"), _hex(c)) for r, c, ok in zip(runs, colors, logged)],
                    [(STYLE_NAMES.get(st, st), what) for st, what in styles.items()] if len(styles) > 1 and drew_lines else [])
    data = [[run.series(resolve(tag, run)) for _, lines in panels for tag, _, _ in lines] for run in runs]
    legend.coincide = [(runs[i].name, runs[j].name) for i in range(len(runs)) for j in range(i + 1, len(runs))
                       if logged[i] and data[i] == data[j]]
    handles = [Line2D([], [], color=c, lw=2.5) for c in colors]
    handles += [Line2D([], [], color="black", ls=st, lw=1.2) for st in styles] if legend.styles else []
    fig.legend(handles, legend.labels(), loc="outside lower center", ncol=min(len(handles), 3 * min(len(panels), 3)),
               fontsize=9,
               frameon=False)
    _save(fig, path)
    return legend


# ---------------------------------------------------------------------- html
def _fmt(v: float | None) -> str:
    if v is None:
        return "&ndash;"
    return f"{v:.4g}"


def _summary_rows(runs: list[RunData]) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn):
        vals = [fn(r) for r in runs]
        if any(v is not None for v in vals):
            rows.append((label, [_fmt(v) for v in vals]))

    add("last step (any scalar)", lambda r: max((max(d) for d in r.scalars.values() if d), default=None))
    for g in _groups_with(runs, log_tags.eval_stat("{}", "score", "mean")):
        add(f"score mean: {g} (latest)", lambda r, g=g: r.latest(log_tags.eval_stat(g, "score", "mean")))
    for c in _groups_with(runs, log_tags.eval_auc("{}", "score")):
        add(f"AUC {c.replace('_', ' ')}: score (latest)", lambda r, c=c: r.latest(log_tags.eval_auc(c, "score")))
    for g in _groups_with(runs, log_tags.copy_stat("{}", "memorized_frac")):
        add(f"memorized fraction: {g} (latest)", lambda r, g=g: r.latest(log_tags.copy_stat(g, "memorized_frac")))

    def last_of(suffix):
        def fn(r):
            tags = r.tags_ending(suffix)
            return r.latest(tags[0]) if tags else None
        return fn

    def median_of(suffix):
        def fn(r):
            tags = r.tags_ending(suffix)
            if not tags:
                return None
            vals = sorted(r.scalars[tags[0]].values())
            return vals[len(vals) // 2] if vals else None
        return fn

    add("loss_mse (latest)", last_of("loss_mse"))
    add("step_time median (s)", median_of("step_time"))
    add("eval seconds (latest)", lambda r: r.latest(log_tags.EVAL_SECONDS))
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
        _name_runs(runs)  # callers that build RunData themselves (the demo) get names too
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

    def section(heading: str, fname: str, panels, ylabel: str, note: str = ""):
        path = assets / fname
        parts.append(f"<h2>{e(heading)}</h2>")
        legend = plot_panels(runs, panels, path, ylabel)
        if legend is not None:
            written.append(path)
            if note:
                parts.append(f"<p class='note'>{e(note)}</p>")
            parts.append(figure_html(f"{e(assets.name)}/{e(fname)}", heading, legend))
        else:
            parts.append("<p class='note'>not logged in these runs</p>")

    groups = _groups_with(runs, log_tags.eval_stat("{}", "score", "mean"))
    section("Detection score per prompt group", "score_curves.png",
            [(g, [(log_tags.eval_stat(g, "score", "mean"), "-", " mean"),
                  (log_tags.eval_stat(g, "score", "p95"), "--", " p95")]) for g in groups],
            "anisotropy score", "solid: mean over the group's prompts; dashed: 95th percentile")
    section("Norm and alignment terms per group", "term_curves.png",
            [(f"{g}: {t}", [(log_tags.eval_stat(g, t, "mean"), "-", "")]) for g in groups for t in ("norm", "align")],
            "mean over prompts")
    contrasts = _groups_with(runs, log_tags.eval_auc("{}", "score"))
    section("Detection AUC over steps", "auc_curves.png",
            [(c.replace("_", " "), [(log_tags.eval_auc(c, t), TERM_STYLES[t], f" {t}") for t in TERMS]) for c in contrasts],
            "AUC", "solid: combined score; dashed: norm; dotted: align")
    section("Detection TPR at 1% FPR over steps", "tpr_curves.png",
            [(c.replace("_", " "), [(log_tags.eval_tpr(c, t), TERM_STYLES[t], f" {t}") for t in TERMS])
             for c in _groups_with(runs, log_tags.eval_tpr("{}", "score"))], "TPR @ 1% FPR")
    section("Copy check: memorized fraction", "memorized_frac.png",
            [(g, [(log_tags.copy_stat(g, "memorized_frac"), "-", "")])
             for g in _groups_with(runs, log_tags.copy_stat("{}", "memorized_frac"))],
            "fraction of generations over the threshold")
    section("Copy check: 95th-percentile similarity to the nearest training image", "copy_sim_p95.png",
            [(g, [(log_tags.copy_stat(g, "sim_p95"), "-", "")])
             for g in _groups_with(runs, log_tags.copy_stat("{}", "sim_p95"))], "similarity")

    section("Guard selectivity: training samples gated and probes fired", "guard_selectivity.png",
            [(g, [(log_tags.guard_gate_rate(g), "-", " gated"), (log_tags.guard_fire_rate(g), "--", " fired")])
             for g in log_tags.FIRE_GROUPS], "share per step",
            "solid: the step's training samples the gate left out of the loss; dashed: the step's probes over "
            "the threshold (penalty guard; groups as the monitor finds duplicates)")

    def first_tag(name):
        def fn(run):  # the exact leaf (train/loss_mse) before unit-suffixed ones
            tags = sorted(run.tags_ending(name), key=lambda t: t.rsplit("/", 1)[-1] != name)
            return tags[0] if tags else ""
        return fn

    section("Training loss (loss_mse)", "loss.png", [("loss_mse", [(first_tag("loss_mse"), "-", "")])], "loss")
    section("Step time (step_time)", "step_time.png", [("step_time", [(first_tag("step_time"), "-", "")])],
            "seconds")

    parts += _latest_media_html(runs, run_headers, assets, written)
    parts.append("</body></html>")
    out.write_text("\n".join(parts), encoding="utf-8")
    (assets / MARKER).write_text("\n".join(p.name for p in written) + "\n")
    return written



def _extra_figures_html(figures: list[tuple[Path, str, str]], assets: Path, written: list[Path]) -> list[str]:
    """Each ``(png_path, heading, caption)`` copied to ``assets`` (added to ``written``) as a figure."""
    import shutil

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
    import io

    from PIL import Image

    if data[:8] == b"\x89PNG\r\n\x1a\n":
        path.write_bytes(data)
    else:
        Image.open(io.BytesIO(data)).save(path, format="PNG")


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="training output dir(s); event files are found recursively")
    parser.add_argument("--out", required=True, help="HTML file to write (PNGs go to <name>_files/ beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--title", default=None, help="page title (default: names the runs)")
    return parser


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    assets = out.parent / f"{out.stem}_files"
    try:
        if out.suffix.lower() not in (".html", ".htm"):
            raise ReportError(f"--out {str(out)!r}: expected an .html file")
        if out.is_dir():
            raise ReportError(f"--out {str(out)!r} is a directory")
        if not args.overwrite:
            if out.exists():
                raise ReportError(f"{str(out)!r} exists; pass --overwrite to replace it")
            if assets.exists() and any(assets.iterdir()):
                raise ReportError(f"{str(assets)!r} exists and is not empty; pass --overwrite to replace the report")
        elif assets.exists() and any(assets.iterdir()) and not (assets / MARKER).is_file():
            raise ReportError(f"{str(assets)!r} exists but was not written by memreg report; not touching it")
        runs = [load_run(d) for d in args.run_dirs]
    except ReportError as err:
        print(f"memreg report: error: {err}", file=sys.stderr)
        return 2
    _name_runs(runs)
    if args.overwrite and (assets / MARKER).is_file():
        for name in (assets / MARKER).read_text().split():
            p = assets / name
            if p.parent == assets and p.is_file():
                p.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    title = args.title or "memreg report: " + ", ".join(r.name for r in runs)
    written = build_report(runs, out, title)
    print(f"wrote {out} ({len(written)} PNGs in {assets})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memreg report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
