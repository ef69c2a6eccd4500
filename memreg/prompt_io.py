"""Read line-based text inputs: prompt lists (plain text, one prompt per line, or jsonl with a
``caption`` field) and JSON-lines files (:func:`iter_jsonl`).

Both share one line reader so that a binary, non-UTF-8 or malformed file is reported the same way
for every input: ``<file>:<line>: <cause>``, the line counted from 1 with blank lines included, as
an editor shows it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from memreg.errors import MemregError

PROMPT_FILE_HINT = "a prompt file is UTF-8 text, one prompt per line"
JSONL_HINT = "a JSON-lines file is UTF-8 text, one JSON value per line"


class PromptFileError(MemregError, ValueError):
    """A prompt file that cannot be used; the message names the file (and line)."""


@dataclass
class PromptList:
    prompts: list[str]
    path: str
    blank_lines: int


def _decode_line(raw: bytes, path: Path, lineno: int, error: Callable[[str], Exception], hint: str) -> str:
    """One line as text (a UTF-8 BOM on the first line is dropped); binary or non-UTF-8 files are named."""
    if b"\0" in raw:
        raise error(f"{path}:{lineno}: contains NUL bytes; {hint}")
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    f"{hint}") from None


def _text_lines(path: Path, error: Callable[[str], Exception], hint: str) -> Iterator[tuple[int, str]]:
    """``(line number from 1, stripped text)`` of every line of ``path``, blank ones included."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, _decode_line(raw, path, lineno, error, hint).strip()


def _json_value(line: str, path: Path, lineno: int, error: Callable[[str], Exception]):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def iter_jsonl(path: str | Path, error: Callable[[str], Exception] = PromptFileError) -> Iterator[tuple[int, object]]:
    """``(line number from 1, JSON value)`` of each non-blank line of the JSON-lines file ``path``.

    A line that is not UTF-8 text or not JSON raises ``error(message)`` (the caller's one-line
    input error, e.g. :class:`memreg.attack.inputs.AttackInputError`) naming ``<path>:<line>``;
    what the values must hold is the caller's to check.
    """
    path = Path(path)
    for lineno, line in _text_lines(path, error, JSONL_HINT):
        if line:
            yield lineno, _json_value(line, path, lineno, error)


def read_prompts(path: str | Path, field: str = "caption") -> PromptList:
    """Prompts of ``path``; ``.jsonl`` files take ``field`` from each line. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist")
    prompts, blank = [], 0
    for lineno, line in _text_lines(path, PromptFileError, PROMPT_FILE_HINT):
        if not line:
            blank += 1
            continue
        if path.suffix == ".jsonl":
            rec = _json_value(line, path, lineno, PromptFileError)
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
