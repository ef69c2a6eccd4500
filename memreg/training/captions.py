"""Caption augmentation and per-image repeats with kohya-ss/sd-scripts' semantics.

Each step's caption (:func:`augment_caption`) follows kohya's ``BaseDataset.process_caption``
(``library/train_util.py``), in its order:

1. ``caption_dropout_rate``: with that probability the whole caption becomes "" and nothing else
   runs (trains the unconditional branch, as ``proportion_empty_prompts`` does).
2. Only when ``shuffle_caption`` is on or ``caption_tag_dropout_rate`` > 0: the caption is split on
   ``caption_separator`` (default ","), each tag stripped of surrounding whitespace; the first
   ``keep_tokens`` tags are kept, in place, in front.
3. ``shuffle_caption``: the other tags are put in a uniformly random order.
4. ``caption_tag_dropout_rate``: each of the other tags, after the shuffle, is dropped with that
   probability; kept tags are never dropped.
5. The tags are joined with ", " (as kohya does, whatever the separator).

With neither shuffle nor tag dropout the caption is returned untouched (no re-joining), so a run with
every augmentation off sees today's strings. Two departures from kohya: empty tags (``"a,,b"``, a
trailing separator) are dropped before ``keep_tokens`` counts, where kohya's plain path keeps them and
shuffles ", ," into the middle; and a multi-line caption is not cut to its first line (a list caption
already gives one caption per sample and epoch).

Randomness: uniform draws from the generator the caller passes, in a fixed order: one for the caption
dropout (only when its rate > 0), then one key per other tag for the shuffle (tags ordered by key),
then one per other tag for the tag dropout (kept iff the draw >= the rate; only when the rate > 0).
The trainer passes a sub-stream of the sample's ``(seed, epoch, index[, repeat])`` key
(:func:`caption_rng`), so captions are exact on resume, identical on every process, and turning
augmentation on or off does not move the crop/flip draws of the main stream.

Repeats (kohya's ``num_repeats``): every training image appears ``num_repeats`` times per epoch
(:func:`expand_repeats`), each repeat with its own randomness. With ``repeats_from_folders`` an image
whose path under ``train_data_dir`` starts with a folder ``N_name`` (kohya's DreamBooth folder
convention, e.g. ``10_mychar/img.png``) is repeated N times instead; the folder rule is opt-in so a
folder such as ``2023_photos`` never multiplies a run by accident.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Spawn key of the caption sub-stream: SeedSequence mixes it apart from the sample's main stream.
_CAPTION_STREAM = 0x43415054
_FOLDER_REPEATS = re.compile(r"([0-9]+)_.*", re.ASCII | re.DOTALL)


class RepeatsError(ValueError):
    """A folder asks for repeats the trainer cannot use; the message names the folder."""


@dataclass(frozen=True)
class CaptionConfig:
    """The caption-augmentation and repeat keys of a run (top-level train config keys, kohya's names)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    num_repeats: int = 1
    repeats_from_folders: bool = False

    def __post_init__(self):
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) \
                    or not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name}={rate!r} must be a number in [0, 1]")
        for name, low in (("keep_tokens", 0), ("num_repeats", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if not isinstance(self.caption_separator, str) or not self.caption_separator:
            raise ValueError(f"caption_separator={self.caption_separator!r} must be a non-empty string")
        for name in ("shuffle_caption", "repeats_from_folders"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")

    @property
    def changes_captions(self) -> bool:
        """Whether :func:`augment_caption` can return anything but its input (and draws at all)."""
        return self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_tag_dropout_rate > 0


def from_train_config(cfg: Any) -> CaptionConfig:
    """The :class:`CaptionConfig` of a train config (same key names); ValueError names a bad key."""
    return CaptionConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(CaptionConfig)})


def caption_rng(sample_key: Sequence[int]) -> np.random.Generator:
    """The caption sub-stream of a sample's RNG key: a spawned child of the same entropy, so it is
    fixed by the key alone and never shares numbers with the key's main stream."""
    seq = np.random.SeedSequence([int(k) for k in sample_key], spawn_key=(_CAPTION_STREAM,))
    return np.random.default_rng(seq)


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """The caption's tags: split on ``separator``, stripped, empty ones dropped."""
    return [t for t in (part.strip() for part in caption.split(separator)) if t]


def augment_caption(caption: str, cfg: CaptionConfig, rng: np.random.Generator) -> str:
    """The step's caption, in kohya's order: caption dropout, then shuffle and tag dropout of the
    tags after the first ``cfg.keep_tokens``, joined with ", " (module docstring: the draws)."""
    if cfg.caption_dropout_rate > 0 and rng.random() < cfg.caption_dropout_rate:
        return ""
    if not (cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0):
        return caption
    tags = split_tags(caption, cfg.caption_separator)
    kept, rest = tags[:cfg.keep_tokens], tags[cfg.keep_tokens:]
    if cfg.shuffle_caption and rest:
        keys = rng.random(len(rest))
        rest = [rest[int(i)] for i in np.argsort(keys, kind="stable")]
    if cfg.caption_tag_dropout_rate > 0 and rest:
        draws = rng.random(len(rest))
        rest = [t for t, u in zip(rest, draws) if u >= cfg.caption_tag_dropout_rate]
    return ", ".join(kept + rest)


def folder_repeats(path: str, root: str) -> int | None:
    """N when ``path`` lies under ``root`` in a first-level folder named ``N_name`` (kohya's
    DreamBooth convention: the digits before the first "_"), else None."""
    try:
        rel = Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return None
    if len(rel.parts) < 2:
        return None
    match = _FOLDER_REPEATS.fullmatch(rel.parts[0])
    return int(match.group(1)) if match else None


def sample_repeats(refs: Sequence[Any], cfg: CaptionConfig, root: str | None) -> list[int] | None:
    """Repeats per sample (aligned with ``refs``), or None when every sample appears once.

    ``cfg.num_repeats`` for every sample; with ``cfg.repeats_from_folders`` and an imagefolder
    ``root``, a sample in a ``N_name`` folder gets N. A folder asking for 0 repeats is a
    :class:`RepeatsError` (kohya skips it; here every training sample is trained on)."""
    out = []
    for ref in refs:
        n = None
        if cfg.repeats_from_folders and root is not None and isinstance(ref, str):
            n = folder_repeats(ref, root)
            if n == 0:
                folder = Path(ref).resolve().relative_to(Path(root).resolve()).parts[0]
                raise RepeatsError(f"folder {folder!r} in {root!r} asks for 0 repeats (N_name with N >= 1, "
                                   "or move its images out)")
        out.append(cfg.num_repeats if n is None else n)
    return None if all(n == 1 for n in out) else out


def expand_repeats(indices: Sequence[int], repeats: Sequence[int] | None) -> list[tuple[int, int]]:
    """``(index, repeat)`` for each index and ``repeat`` in ``range(repeats[index])``, in index order
    (the sampler shuffles); ``repeats`` None means once each."""
    if repeats is None:
        return [(int(i), 0) for i in indices]
    return [(int(i), r) for i in indices for r in range(int(repeats[i]))]
