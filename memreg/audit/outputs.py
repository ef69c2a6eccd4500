"""The audit's files: ``clusters.jsonl``, ``captions.jsonl`` (pass 2 over the shards) and ``audit.html``.

``clusters.jsonl``: one line per image cluster of >= ``min_cluster`` rows, highest risk first:
``{"rank", "cluster", "size", "images", "risk", "max_score", "score_quantile", "captions",
"members": [{"row", "name", "sha256", "caption"}]}``. ``members[*].sha256`` is the monitor's
pixel-hash key (``--eval.duplicates_from`` reads it).

``captions.jsonl``: one line per normalised caption that repeats, or is among the ``top_k``
highest-scoring: ``{"caption", "normalized", "count", "variants": {text: count}, "score", "norm",
"align", "clusters", "rows"}``, most repeated first, then highest score.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from memreg.audit.captions import normalize_caption
from memreg.audit.merge import ClusterTable, RowIndex, finite_or_none
from memreg.audit.shards import read_shard
from memreg.audit.source import AuditSource, open_rgb
from memreg.duplicates import CLUSTER_ID, CLUSTER_MEMBERS, MEMBER_HASH
from memreg.keys import text_key
from memreg.sharding import shard_ranges

ROWS_LISTED = 20       # rows listed per caption group
CAPTIONS_LISTED = 20   # distinct captions listed per cluster


def wanted_captions(idx: RowIndex, top_k: int) -> set[int]:
    """Normalised caption keys that repeat, plus those of the ``top_k`` highest-scoring rows."""
    keys = idx.cap_norm[idx.cap_norm != 0]
    u, c = np.unique(keys, return_counts=True)
    repeated = set(int(k) for k in u[c > 1])
    scored = np.flatnonzero(np.isfinite(idx.score) & (idx.cap_norm != 0))
    top: set[int] = set()
    for i in scored[np.argsort(-idx.score[scored], kind="stable")]:
        if len(top) >= top_k:
            break
        top.add(int(idx.cap_norm[i]))
    return repeated | top


def collect(out: Path, num_rows: int, shard_size: int, labels: np.ndarray, table: ClusterTable,
            caption_keys: set[int]) -> tuple[dict, dict]:
    """Pass 2: members of the listed clusters and the texts/scores of the listed caption groups."""
    members = {int(lab): [] for lab in table.label}
    groups: dict[int, dict] = {}
    for k in range(len(shard_ranges(num_rows, shard_size))):
        for x in read_shard(out, k)[1]:
            i = x["row"]
            lab = int(labels[i])
            if lab in members:
                members[lab].append({"row": i, "name": x["name"], MEMBER_HASH: x["sha256"], "caption": x["caption"]})
            if not x["caption"]:
                continue
            norm = normalize_caption(x["caption"])
            key = text_key(norm)
            if key not in caption_keys:
                continue
            g = groups.setdefault(key, {"caption": x["caption"], "normalized": norm, "count": 0, "variants": {},
                                        "score": None, "norm": None, "align": None, "clusters": set(), "rows": []})
            g["count"] += 1
            g["variants"][x["caption"]] = g["variants"].get(x["caption"], 0) + 1
            if x["score"] is not None and (g["score"] is None or x["score"] > g["score"]):
                g["score"], g["norm"], g["align"] = x["score"], x["norm"], x["align"]
            if lab >= 0:
                g["clusters"].add(lab)
            if len(g["rows"]) < ROWS_LISTED:
                g["rows"].append(i)
    return members, groups


def cluster_lines(table: ClusterTable, members: dict) -> list[dict]:
    out = []
    for r in range(len(table.label)):
        m = members[int(table.label[r])]
        caps = list(dict.fromkeys(x["caption"] for x in m if x["caption"]))[:CAPTIONS_LISTED]
        out.append({"rank": r + 1, CLUSTER_ID: int(table.label[r]), "size": int(table.size[r]),
                    "images": int(table.images[r]), "risk": round(float(table.risk[r]), 6),
                    "max_score": finite_or_none(table.max_score[r]),
                    "score_quantile": round(float(table.quantile[r]), 6), "captions": caps, CLUSTER_MEMBERS: m})
    return out


def caption_lines(groups: dict) -> list[dict]:
    lines = []
    for g in groups.values():
        lines.append(dict(g, clusters=len(g["clusters"])))
    lines.sort(key=lambda g: (-g["count"], -(g["score"] if g["score"] is not None else -np.inf), g["normalized"]))
    return lines


def write_jsonl(path: Path, lines) -> None:
    with path.open("w", encoding="utf-8") as f:
        for x in lines:
            f.write(json.dumps(x, ensure_ascii=False) + "\n")


def _thumb(source: AuditSource, row: int, side: int = 96) -> str:
    """A data: URI of a PNG thumbnail of ``row``'s image ("" if unreadable)."""
    try:
        img = open_rgb(source.row(row).image)
    except Exception:
        return ""
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_html(path: Path, source: AuditSource, clusters: list[dict], summary: dict,
               top: int = 20, per_cluster: int = 8) -> None:
    """``audit.html``: the summary and the ``top`` riskiest clusters as thumbnail rows."""
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>memreg audit</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}img{margin:2px;border:1px solid #ccc}"
             "td{vertical-align:top;padding:4px}pre{background:#f6f6f6;padding:.5em}</style>",
             f"<h1>memreg audit: {esc(str(summary['data']['path']))}</h1>",
             f"<pre>{esc(json.dumps(summary['counts'], indent=1))}</pre>",
             f"<h2>Top {min(top, len(clusters))} clusters by risk</h2><table>",
             "<tr><th>rank</th><th>size</th><th>images</th><th>risk</th><th>max score</th><th>copies</th></tr>"]
    for c in clusters[:top]:
        seen, thumbs = set(), []
        for m in c["members"]:
            if m[MEMBER_HASH] not in seen and len(thumbs) < per_cluster:
                seen.add(m[MEMBER_HASH])
                thumbs.append(f"<img src='{_thumb(source, m['row'])}' title='{esc(m['name'])}'>")
        score = "n/a" if c["max_score"] is None else f"{c['max_score']:.4f}"
        caps = "<br>".join(esc(t) for t in c["captions"][:3])
        parts.append(f"<tr><td>{c['rank']}</td><td>{c['size']}</td><td>{c['images']}</td><td>{c['risk']:.3f}</td>"
                     f"<td>{score}</td><td>{''.join(thumbs)}<br><small>{caps}</small></td></tr>")
    parts.append("</table>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
