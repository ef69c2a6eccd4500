"""Read prompt lists: plain text (one prompt per line) or jsonl with a ``caption`` field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file (and line)."""


@dataclass
class PromptList:
    prompts: list[str]
    path: str
    blank_lines: int


def read_prompts(path: str | Path, field: str = "caption") -> PromptList:
    """Prompts of ``path``; ``.jsonl`` files take ``field`` from each line. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist")
    prompts, blank = [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
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
