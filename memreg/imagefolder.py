"""The checks an imagefolder (a folder with ``metadata.jsonl``) gets before ``datasets`` reads it.

Both the trainer and ``memreg audit`` call :func:`check_imagefolder`, because ``datasets`` reports an
empty file as an IndexError, a bad line by a 0-based row number that skips blank lines, and reads a
``file_name`` wherever it points. Here every error names the file and its 1-based line, as an editor
shows it. A ``file_name`` that leaves the data folder (``../``, an absolute path) or is a symbolic link
to a file outside it is refused unless the caller allows external files: a dataset someone else
built should not make a training run read ``/etc/passwd`` or a private folder beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from memreg.errors import MemregError

METADATA_NAME = "metadata.jsonl"


class MetadataError(MemregError, ValueError):
    """An imagefolder that cannot be used; the message names the file, the 1-based line and the cause."""


def metadata_files(root: Path) -> list[Path]:
    """``metadata.jsonl`` at the top of ``root`` and one folder down (the layouts ``datasets`` reads)."""
    return sorted(root.glob(METADATA_NAME)) + sorted(root.glob(f"*/{METADATA_NAME}"))


def outside_problem(root: Path, target: Path, name: str) -> str | None:
    """Why ``target`` (the file a record's ``file_name`` ``name`` points at) is outside ``root``, or None.
    ``..`` and absolute paths are judged as written; symbolic links by where they resolve."""
    lexical = Path(os.path.normpath(target))
    if not lexical.is_relative_to(Path(os.path.normpath(root))):
        return f"file_name {name!r} leaves the data folder {str(root)!r}"
    real = Path(os.path.realpath(lexical))
    if not real.is_relative_to(Path(os.path.realpath(root))):
        return f"file_name {name!r} is a symbolic link to {str(real)!r}, outside the data folder {str(root)!r}"
    return None


def _json_type(value) -> str | None:
    """A JSON value's type, with its article, as Arrow unifies them (int and float are one number; null
    fits any)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}[type(value)]


def _check_types(rec: dict, first_type: dict, path: Path, lineno: int) -> None:
    """Every key keeps one JSON type over the file (Arrow refuses a column that changes, naming a 0-based row)."""
    for key, value in rec.items():
        kind = _json_type(value)
        if kind is None:
            continue
        seen = first_type.setdefault(key, (kind, lineno))
        if seen[0] != kind:
            raise MetadataError(f"{path}:{lineno}: {key!r} is {kind} here but {seen[0]} on line {seen[1]} "
                                "(a column keeps one type)")


def check_metadata_file(path: Path, root: Path | None = None, allow_external: bool = False,
                        allow_flag: str = "--allow_external_files true") -> int:
    """Number of records of ``path``; :class:`MetadataError` for an empty file, a line that is not UTF-8
    or not a JSON object, a record without ``file_name``, or (unless ``allow_external``) a file outside
    ``root`` (default: the metadata file's folder). ``allow_flag``: how the caller's user allows it."""
    root = Path(root) if root is not None else path.parent
    records = 0
    first_type: dict[str, tuple[str, int]] = {}   # key -> (JSON type, line it was first seen on)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                raise MetadataError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetadataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise MetadataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if "file_name" not in rec:
                raise MetadataError(f"{path}:{lineno}: record has no 'file_name' (keys: {sorted(rec)})")
            if not isinstance(rec["file_name"], str) or not rec["file_name"]:
                raise MetadataError(f"{path}:{lineno}: file_name must be a non-empty string, got {rec['file_name']!r}")
            name = rec["file_name"]
            problem = None if allow_external else outside_problem(root, path.parent / name, name)
            if problem:
                raise MetadataError(f"{path}:{lineno}: {problem}; pass {allow_flag} to read it")
            _check_types(rec, first_type, path, lineno)
            records += 1
    if not records:
        raise MetadataError(f"{path} has no records (one JSON object per line with file_name and the caption column)")
    return records


def check_imagefolder(root: str | Path, allow_external: bool = False,
                      allow_flag: str = "--allow_external_files true") -> list[Path]:
    """Check every metadata file of the imagefolder ``root``; returns them. ``root`` must have one."""
    root = Path(root)
    metas = metadata_files(root)
    if not metas:
        raise MetadataError(f"data folder {str(root)!r} has no {METADATA_NAME} (one JSON object per line with file_name and "
                            "the caption column)")
    for meta in metas:
        check_metadata_file(meta, root, allow_external, allow_flag)
    return metas
