"""Read and check what ``memreg attack`` is given: imagefolders and an audit's ``clusters.jsonl``.

Every user mistake is found here, before any weights load, and raised as :class:`AttackInputError`
whose message is ``<file>:<row>: <cause>`` (or ``--flag: <cause>``), one line: the CLI prints it
after ``memreg attack: error:`` and exits with 2. An imagefolder is a directory with a
``metadata.jsonl`` whose rows name an image (``file_name``, relative to the directory) and hold a
caption (a string, or a list of strings: every entry is one training wording). Images are decoded
with :func:`memreg.image_io.load_rgb`, the one way memreg reads images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from memreg.errors import MemregError
from memreg.image_io import load_rgb
from memreg.imagefolder import check_metadata_file
from memreg.prompt_io import iter_jsonl

METADATA = "metadata.jsonl"


class AttackInputError(MemregError, ValueError):
    """A user mistake in the attack's input; the message is one line naming the file/row or flag."""


@dataclass
class FolderRow:
    """One row of an imagefolder's ``metadata.jsonl`` (``line`` counts from 1)."""

    line: int
    file_name: str
    captions: list[str]
    path: Path


@dataclass
class ClusterSpec:
    """One line of ``clusters.jsonl``: the audit's cluster id and its members' pixel hashes."""

    line: int
    cluster: int | str
    hashes: list[str]
    captions: list[str]


def _captions(value, where: str, column: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise AttackInputError(f"{where}: caption column {column!r} must be a string or a list of strings, "
                               f"got {type(value).__name__}")
    return [c.strip() for c in value if c.strip()]


def read_imagefolder(folder: str | Path, caption_column: str, flag: str, allow_external: bool = False) -> list[FolderRow]:
    """The rows of ``folder/metadata.jsonl``; checks every row names an existing file inside the
    folder and has a caption.

    The file's shape (JSON objects with a non-empty ``file_name`` that stays inside the folder) is
    checked by :func:`memreg.imagefolder.check_metadata_file`, the trainer's and the audit's check,
    so that the three refuse the same files in the same words; only the attack's own needs (a
    caption, an existing image) are checked here.
    """
    root = Path(folder)
    if not root.is_dir():
        raise AttackInputError(f"{flag} {str(folder)!r}: no such directory")
    meta = root / METADATA
    if not meta.is_file():
        raise AttackInputError(f"{meta}: missing ({flag} must be an imagefolder with a {METADATA})")
    check_metadata_file(meta, root, allow_external, "--allow-external-files")
    rows = []
    for n, rec in iter_jsonl(meta, AttackInputError):
        where, name = f"{meta}:{n}", rec["file_name"]
        if caption_column not in rec:
            raise AttackInputError(f"{where}: no caption column {caption_column!r} (keys: {sorted(rec)}); "
                                   "pass --caption-column")
        path = root / name
        if not path.is_file():
            raise AttackInputError(f"{where}: image file {name!r} does not exist")
        rows.append(FolderRow(n, name, _captions(rec[caption_column], where, caption_column), path))
    if not rows:
        raise AttackInputError(f"{meta}: no rows")
    return rows


def decode_row(meta: Path, row: FolderRow) -> Image.Image:
    """The row's image as RGB; an undecodable file is an :class:`AttackInputError` naming the row."""
    try:
        return load_rgb(row.path)
    except ValueError as e:  # memreg.image_io.ImageDecodeError
        raise AttackInputError(f"{meta}:{row.line}: {e}") from None


def read_clusters(path: str | Path) -> list[ClusterSpec]:
    """The clusters of a ``memreg audit`` run, in file order (highest risk first)."""
    p = Path(path)
    if not p.is_file():
        raise AttackInputError(f"--clusters {str(path)!r}: no such file")
    out = []
    for n, rec in iter_jsonl(p, AttackInputError):
        where = f"{p}:{n}"
        members = rec.get("members") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or "cluster" not in rec or not isinstance(members, list) or not members:
            raise AttackInputError(f"{where}: not a memreg audit cluster (needs 'cluster' and a non-empty "
                                   "'members' list)")
        hashes, captions = [], []
        for m in members:
            if not isinstance(m, dict) or not isinstance(m.get("sha256"), str):
                raise AttackInputError(f"{where}: a member without a 'sha256' pixel hash")
            hashes.append(m["sha256"])
            if isinstance(m.get("caption"), str) and m["caption"].strip():
                captions.append(m["caption"].strip())
        out.append(ClusterSpec(n, rec["cluster"], hashes, captions))
    return out
