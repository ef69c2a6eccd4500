"""Helpers that several ``memreg`` commands share: flags, their checks, and the run's versions.

Each helper turns a user mistake into a :class:`CommandError` whose message names the flag, so
every command reports the same mistake in the same words (``memreg.cli`` prints it on one line and
exits with 2). Library code never imports this module: it works on plain values, not flags.
"""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import diffusers
import numpy as np
import sklearn
import torch
import transformers

from memreg.argtypes import finite_float
from memreg.errors import MemregError
from memreg.models import ModelError, parse_dtype
from memreg.prompt_io import PromptFileError, PromptList, read_prompts
from memreg.score import PRESETS


class CommandError(MemregError, ValueError):
    """A bad command-line value; the message is one line naming the flag."""


# --------------------------------------------------------------------------------------------
# Shared flags
# --------------------------------------------------------------------------------------------

def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how the model runs: ``--device``, ``--dtype``, ``--revision``, ``--variant``, ``--no-progress``."""
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float16 on cuda, else float32)")
    p.add_argument("--revision", default=None, help="hub revision of --model")
    p.add_argument("--variant", default=None, help="weight variant of --model (e.g. fp16)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def add_sampling_arguments(p: argparse.ArgumentParser, steps_flag: str, seed_help: str) -> None:
    """How images are sampled, for every command that generates some: the DDIM step count
    (``steps_flag``: each command keeps its published flag name), ``--guidance-scale`` and
    ``--seed``, with the same defaults everywhere."""
    p.add_argument(steps_flag, type=int, default=20, help="DDIM sampling steps per generation")
    p.add_argument("--guidance-scale", type=finite_float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help=seed_help)


# --------------------------------------------------------------------------------------------
# Reading and checking flag values
# --------------------------------------------------------------------------------------------

def read_prompt_file(path: str, flag: str) -> PromptList:
    """The prompts of ``path`` (:func:`memreg.prompt_io.read_prompts`); an error names ``flag``."""
    try:
        return read_prompts(path)
    except PromptFileError as e:
        raise PromptFileError(f"{flag}: {e}") from None


def resolve_weights(preset: str | None, g1: float | None, g2: float | None) -> tuple[str | None, float, float]:
    """``(preset, g1, g2)`` of ``--preset`` or ``--g1``/``--g2`` (exclusive; default preset sd1, and
    sd1's value for a weight not given); preset is None when weights were given."""
    if preset is not None and (g1 is not None or g2 is not None):
        raise CommandError("--preset and --g1/--g2 are exclusive; give one or the other")
    if g1 is None and g2 is None:
        preset = preset or "sd1"
        return preset, *PRESETS[preset]
    d1, d2 = PRESETS["sd1"]
    return None, (d1 if g1 is None else g1), (d2 if g2 is None else g2)


def device_and_dtype(device: str | None, dtype: str | None,
                     default_device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """``--device`` (default: ``default_device``, else cuda if available, else cpu) and ``--dtype``
    (default: float16 on cuda, else float32)."""
    try:
        dev = torch.device(device or default_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise CommandError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available")
    try:
        return dev, parse_dtype(dtype or ("float16" if dev.type == "cuda" else "float32"))
    except ModelError as e:
        raise CommandError(f"--dtype: {e}") from None


def _require_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {str(out)!r} exists and is not a directory")


def check_out_keeps(out: Path, files: tuple[str, ...], overwrite: bool) -> None:
    """``--out`` may exist, but none of ``files`` in it is replaced without ``--overwrite``."""
    _require_dir(out)
    existing = [f for f in files if (out / f).exists()]
    if existing and not overwrite:
        raise CommandError(f"--out {str(out)!r} already has {', '.join(existing)}; pass --overwrite to replace")


def check_out_empty(out: Path) -> None:
    """``--out`` must be new or empty: nothing in it is overwritten."""
    _require_dir(out)
    if out.is_dir() and any(out.iterdir()):
        raise CommandError(f"--out {str(out)!r} is not empty; choose a new directory (nothing is overwritten)")


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------

def versions() -> dict:
    """The library versions a run's numbers depend on, recorded in its report (memreg: None when
    it is not installed as a distribution)."""
    try:
        memreg_version = version("memreg")
    except PackageNotFoundError:
        memreg_version = None
    return {"memreg": memreg_version, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "scikit-learn": sklearn.__version__,
            "numpy": np.__version__, "python": platform.python_version()}
