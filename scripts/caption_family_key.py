"""Should caption families join the gate's item key? Measured on a training set, without a fine-tune.

The gate flags items (``guard.gate_key: image``: a row's image joined with its near-duplicates,
``memreg.training.item_clusters``). A *caption family* would also join rows whose wordings normalise
to the same text (``memreg.audit.captions.normalize_caption``; with ``--separator`` the tags are
sorted too, so a shuffled caption falls in its family). Joining them helps when a copy the image
rule misses shares a wording with its photo; it costs when ordinary images share a caption: one
chance flag then takes all of them out. For the image key and for image + family, printed per key:

* duplicated rows (metadata ``group: duplicated``) outside their photo's largest item: copies the
  key does not join (``source`` names the photo);
* the ordinary rows in one item with a duplicated row: ordinary images a photo's flag takes out;
* the mean item size over ordinary rows: what one chance flag of an ordinary row takes out.

    python scripts/caption_family_key.py --data .cache/memreg-demo/data-<key>/train [--separator " and "]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memreg.audit.captions import normalize_caption  # noqa: E402
from memreg.training.item_clusters import build_item_index  # noqa: E402


def family_of(text: str, separator: str | None) -> str:
    """A wording's family: its normalised text, its tags sorted when ``separator`` splits it into tags."""
    if not separator:
        return normalize_caption(text)
    return " | ".join(sorted(normalize_caption(t) for t in text.split(separator) if normalize_caption(t)))


def components(n: int, links: list[tuple[int, int]]) -> np.ndarray:
    """Connected-component label per row of ``n`` rows joined by ``links`` (scipy's connected_components)."""
    a = np.array(links, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(a)), (a[:, 0], a[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def key_stats(rows: list[dict], labels: np.ndarray) -> dict:
    """The three figures of the module docstring for one keying of ``rows``."""
    dup = [i for i, r in enumerate(rows) if r["group"] == "duplicated"]
    ordinary = [i for i, r in enumerate(rows) if r["group"] != "duplicated"]
    missed = 0
    for src in {rows[i]["source"] for i in dup}:
        mine = [labels[i] for i in dup if rows[i]["source"] == src]
        missed += len(mine) - Counter(mine).most_common(1)[0][1]
    dup_items = {labels[i] for i in dup}
    size = Counter(labels.tolist())
    return {"dup_rows": len(dup), "dup_rows_outside_their_photo_item": missed,
            "ordinary_rows": len(ordinary), "ordinary_rows_in_a_photo_item": sum(labels[i] in dup_items for i in ordinary),
            "ordinary_mean_item_size": float(np.mean([size[labels[i]] for i in ordinary])) if ordinary else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="an imagefolder split with metadata.jsonl (file_name, caption(s), group)")
    p.add_argument("--separator", default=None, help="tag separator: families sort tags (kohya's caption_separator)")
    p.add_argument("--kind", default="near", choices=["near", "exact"], help="the image key (eval.item_clusters)")
    args = p.parse_args(argv)
    root = Path(args.data)
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as cache:
        index = build_item_index([str(root / r["file_name"]) for r in rows], cache, kind=args.kind, progress=False)
    image_links: list[tuple[int, int]] = []
    first: dict[str, int] = {}
    for i, h in enumerate(index.hashes):
        image_links.append((first.setdefault(h, i), i))
    family_links = list(image_links)
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        for text in r.get("captions") or [r["caption"]]:
            family_links.append((seen.setdefault(family_of(text, args.separator), i), i))
    n = len(rows)
    print(f"{root}: {n} rows; image key: {args.kind} items; families: normalised text"
          + (f", tags split by {args.separator!r} and sorted" if args.separator else ""))
    print(f"{'key':16s} {'dup rows outside their photo item':>34s} {'ordinary rows in a photo item':>30s} "
          f"{'ordinary mean item size':>24s}")
    for name, links in (("image", image_links), ("image + family", family_links)):
        s = key_stats(rows, components(n, links))
        print(f"{name:16s} {s['dup_rows_outside_their_photo_item']:>21d} of {s['dup_rows']:<10d} "
              f"{s['ordinary_rows_in_a_photo_item']:>17d} of {s['ordinary_rows']:<10d} {s['ordinary_mean_item_size']:>24.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
