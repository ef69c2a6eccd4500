"""Which images the attack tries to reproduce: trained targets and the never-seen control.

Rows are grouped into images by decoded pixels (:func:`memreg.duplicates.content_hash`, the
monitor's and the audit's key). **Trained targets** are, first, every duplicated image -- the
clusters of ``clusters.jsonl`` in its order (highest risk first) when given, matched to the
training rows by their members' pixel hashes, otherwise every image held by >= 2 rows, most
copies first -- then a seeded random sample of the other images, ``max_targets`` in all.
Duplicated images come first because they are what a model memorizes. A target's wordings are
the distinct captions of all its rows, most frequent first (at most ``max_wordings``): every way
the training set described it.

**Control targets** are images of the control folder, which the model never saw; one in the
training set too is an input error, since its "extraction" would not be a false positive.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from memreg.attack.inputs import METADATA, AttackInputError, ClusterSpec, FolderRow, decode_row
from memreg.duplicates import content_hash


@dataclass
class Target:
    """One image to reproduce, with every training wording of it."""

    id: str                     # "trained-00003" / "control-00001": stable across runs of one input
    kind: str                   # "trained" | "control"
    image: Image.Image
    wordings: list[str]
    copies: int                 # rows holding the image (all members of its cluster)
    file_name: str              # the representative row's file
    cluster: int | str | None = None


@dataclass
class ImageGroup:
    """Rows with the same decoded pixels."""

    sha256: str
    rows: list[FolderRow] = field(default_factory=list)


def group_images(folder: str | Path, rows: list[FolderRow]) -> dict[str, ImageGroup]:
    """pixel hash -> its rows, in order of first occurrence; decodes every row (errors name the row)."""
    meta = Path(folder) / METADATA
    groups: dict[str, ImageGroup] = {}
    for r in rows:
        h = content_hash(decode_row(meta, r))
        groups.setdefault(h, ImageGroup(h)).rows.append(r)
    return groups


def _wordings(rows: list[FolderRow], extra: list[str], max_wordings: int) -> list[str]:
    counts = Counter(c for r in rows for c in r.captions) + Counter(extra)
    return [c for c, _ in sorted(counts.items(), key=lambda kv: -kv[1])][:max_wordings]


def _target(folder: Path, kind: str, k: int, groups: list[ImageGroup], max_wordings: int,
            extra: list[str] = (), cluster=None) -> Target:
    rep = max(groups, key=lambda g: len(g.rows))
    rows = [r for g in groups for r in g.rows]
    image = decode_row(folder / METADATA, rep.rows[0])
    return Target(f"{kind}-{k:05d}", kind, image, _wordings(rows, list(extra), max_wordings), len(rows),
                  rep.rows[0].file_name, cluster)


def _duplicated(groups: dict[str, ImageGroup], clusters: list[ClusterSpec] | None,
                clusters_path: str | None) -> list[tuple[list[ImageGroup], list[str], object]]:
    """(image groups, extra captions, cluster id) of each duplicated image, most at risk first."""
    if clusters is None:
        dup = [g for g in groups.values() if len(g.rows) >= 2]
        return [([g], [], None) for g in sorted(dup, key=lambda g: -len(g.rows))]
    out = []
    for c in clusters:
        matched = [groups[h] for h in dict.fromkeys(c.hashes) if h in groups]
        if not matched:
            raise AttackInputError(f"{clusters_path}:{c.line}: cluster {c.cluster!r} matches no image of --data "
                                   "(its pixel hashes differ; was clusters.jsonl written for another dataset?)")
        out.append((matched, [], c.cluster))
    return out


def select_trained(folder: str | Path, groups: dict[str, ImageGroup], max_targets: int, max_wordings: int,
                   seed: int, clusters: list[ClusterSpec] | None = None,
                   clusters_path: str | None = None) -> list[Target]:
    """Every duplicated image (at most ``max_targets``), then a seeded sample of the rest."""
    folder = Path(folder)
    dup = _duplicated(groups, clusters, clusters_path)[:max_targets]
    used = {g.sha256 for gs, _, _ in dup for g in gs}
    rest = [g for g in groups.values() if g.sha256 not in used]
    n_rest = min(len(rest), max_targets - len(dup))
    pick = sorted(np.random.default_rng(seed).choice(len(rest), size=n_rest, replace=False)) if n_rest else []
    chosen = dup + [([rest[int(i)]], [], None) for i in pick]
    return [_target(folder, "trained", k, gs, max_wordings, extra, cluster)
            for k, (gs, extra, cluster) in enumerate(chosen)]


def select_control(folder: str | Path, groups: dict[str, ImageGroup], train_hashes, n: int, max_wordings: int,
                   seed: int) -> list[Target]:
    """``n`` control images (a seeded sample); refuses one that is also a training image."""
    folder = Path(folder)
    for g in groups.values():
        if g.sha256 in train_hashes:
            raise AttackInputError(f"{folder / METADATA}:{g.rows[0].line}: image {g.rows[0].file_name!r} is also "
                                   "in --data; the control must hold images the model never saw")
    items = list(groups.values())
    n = min(n, len(items))
    pick = sorted(np.random.default_rng(seed + 1).choice(len(items), size=n, replace=False))
    return [_target(folder, "control", k, [items[int(i)]], max_wordings) for k, i in enumerate(pick)]


def interleave(trained: list[Target], control: list[Target]) -> list[Target]:
    """Trained and control targets alternating (the rest of the longer list at the end), so a run
    stopped by its time budget has attacked both sides about equally."""
    out = []
    for i in range(max(len(trained), len(control))):
        out += [t[i] for t in (trained, control) if i < len(t)]
    return out
