"""Read prompt lists: plain text (one prompt per line) or jsonl with a ``caption`` field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from memreg.errors import MemregError


class PromptFileError(MemregError, ValueError):
    """A prompt file that cannot be used; the message names the file (and line)."""


@dataclass
class PromptList:
    prompts: list[str]
    path: str
    blank_lines: int


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    """One line as text (a UTF-8 BOM on the first line is dropped); binary or non-UTF-8 files are named."""
    if b"\0" in raw:
        raise PromptFileError(f"{path}:{lineno}: contains NUL bytes; a prompt file is UTF-8 text, one prompt per line")
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                              "a prompt file is UTF-8 text, one prompt per line") from None


def read_prompts(path: str | Path, field: str = "caption") -> PromptList:
    """Prompts of ``path``; ``.jsonl`` files take ``field`` from each line. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist")
    prompts, blank = [], 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, path, lineno).strip()
            if not line:
                blank += 1
                continue
            if path.suffix == ".jsonl":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or field not in rec:
                    raise PromptFileError(f"{path}:{lineno}: jsonl record has no {field!r} field")
                line = str(rec[field]).strip()
                if not line:
                    blank += 1
                    continue
            prompts.append(line)
    if not prompts:
        raise PromptFileError(f"prompt file {str(path)!r} has no prompts")
    return PromptList(prompts, str(path), blank)
