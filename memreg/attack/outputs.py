"""The attack's results: rates with Wilson intervals, ``attack.json``, ``attack.html``, the table.

Rates are **cumulative** over the attacks in their order: the ``embedding`` rate is the share of
targets extracted by the training wordings, the perturbed wordings *or* the embedding search (an
attacker tries them all; with ``stop_at_success`` a target extracted early is not attacked
further). Each rate has its 95% Wilson interval (scipy's ``binomtest``, the interval the demo's
copy rates use), for trained and control targets side by side: the control's rate is the
attack's false-positive rate, so a trained rate inside the control's interval is no evidence of
extraction.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from PIL import Image

IMAGES_DIR = "images"
KINDS = ("trained", "control")


def wilson(k: int, n: int) -> dict:
    """``{"rate", "k", "n", "ci95"}``: k of n with its 95% Wilson interval (nan for n = 0)."""
    if n == 0:
        return {"rate": float("nan"), "k": 0, "n": 0, "ci95": [float("nan"), float("nan")]}
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(method="wilson")
    return {"rate": k / n, "k": k, "n": n, "ci95": [float(ci.low), float(ci.high)]}


def extracted_by_level(record: dict, attacks: list[str]) -> dict[str, bool]:
    """attack -> whether the record was extracted by it or an earlier one."""
    out, hit = {}, False
    for a in attacks:
        r = record["attacks"].get(a)
        hit = hit or bool(r and r["success"])
        out[a] = hit
    return out


def rates(records: list[dict], attacks: list[str]) -> dict:
    """kind -> attack -> cumulative Wilson rate (see the module doc)."""
    out = {}
    for kind in KINDS:
        mine = [extracted_by_level(r, attacks) for r in records if r["kind"] == kind]
        out[kind] = {a: wilson(sum(m[a] for m in mine), len(mine)) for a in attacks}
    return out


def seconds_per_target(records: list[dict], attacks: list[str]) -> dict:
    """attack -> mean seconds per target over the targets that ran it (None if none did)."""
    out = {}
    for a in attacks:
        s = [r["attacks"][a]["seconds"] for r in records if a in r["attacks"] and "skipped" not in r["attacks"][a]]
        out[a] = sum(s) / len(s) if s else None
    return out


def save_image(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def image_paths(out: Path, target_id: str) -> tuple[Path, Path]:
    return out / IMAGES_DIR / f"{target_id}-target.png", out / IMAGES_DIR / f"{target_id}-best.png"


def _fmt(r: dict) -> str:
    if r["n"] == 0:
        return "n/a"
    lo, hi = r["ci95"]
    return f"{r['rate']:.2f} [{lo:.2f},{hi:.2f}] ({r['k']}/{r['n']})"


def format_table(report: dict) -> str:
    """The per-attack cumulative rates, trained beside control."""
    rs, attacks = report["rates"], report["settings"]["attacks"]
    head = ["attack (cumulative)", "trained extracted [95% CI]", "control = false positives [95% CI]", "s/target"]
    rows = [[("+" if i else "") + a, _fmt(rs["trained"][a]), _fmt(rs["control"][a]),
             "-" if report["seconds_per_target"][a] is None else f"{report['seconds_per_target'][a]:.2f}"]
            for i, a in enumerate(attacks)]
    w = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows])


def build_report(records: list[dict], meta: dict, complete: bool) -> dict:
    """The attack.json dict: ``meta`` (inputs, settings, detector) plus rates and every record."""
    attacks = meta["settings"]["attacks"]
    return {"command": "attack", **meta, "complete": complete,
            "counts": {k: sum(r["kind"] == k for r in records) for k in KINDS},
            "rates": rates(records, attacks), "seconds_per_target": seconds_per_target(records, attacks),
            "targets": records}


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_json_safe(report), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _row_html(r: dict, out: Path) -> str:
    target, best = (p.relative_to(out).as_posix() for p in image_paths(out, r["id"]))
    has_best = (out / best).is_file()
    sim = "-" if r["best_similarity"] is None else f"{r['best_similarity']:.3f}"
    how = html.escape(json.dumps(r["best"], ensure_ascii=False))
    verdict = f"extracted by {html.escape(r['extracted_by'])}" if r["extracted"] else "not extracted"
    return (f"<tr class='{'hit' if r['extracted'] else ''}'><td>{html.escape(r['id'])}<br>{html.escape(r['kind'])}, "
            f"{r['copies']} row(s)</td><td><img src='{html.escape(target)}'></td>"
            f"<td>{'<img src=' + repr(html.escape(best)) + '>' if has_best else '-'}</td>"
            f"<td>{sim}</td><td>{verdict}</td><td>{html.escape(' | '.join(r['wordings']))}</td>"
            f"<td><code>{how}</code></td></tr>")


def write_html(path: Path, report: dict) -> None:
    """Each target beside its best reproduction (captions and every text escaped)."""
    out = path.parent
    thr = report["detector"]["threshold"]
    rows = "\n".join(_row_html(r, out) for r in report["targets"])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>memreg attack</title><style>
body{{font-family:sans-serif;margin:1.5em}} td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}} img{{width:128px;height:128px;image-rendering:pixelated}} tr.hit{{background:#fdd}}
pre{{background:#f6f6f6;padding:8px}}</style></head><body>
<h1>memreg attack</h1>
<p>Model {html.escape(str(report['model']))}{' + LoRA ' + html.escape(str(report['lora'])) if report.get('lora') else ''};
detector {html.escape(report['detector']['name'])}, extracted when similarity &gt; {thr:.3f}.
{'' if report['complete'] else '<b>Incomplete run (time budget): run the same command again to continue.</b>'}</p>
<pre>{html.escape(format_table(report))}</pre>
<table><tr><th>target</th><th>training image</th><th>best reproduction</th><th>similarity</th><th>verdict</th>
<th>training wordings</th><th>how</th></tr>
{rows}
</table></body></html>
"""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
