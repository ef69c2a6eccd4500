"""argparse value types shared by the commands: numbers that must be finite.

``type=float`` accepts ``nan`` and ``inf``; a NaN threshold then compares false with everything and
silently turns a check off (``memreg generate --tau nan`` flagged nothing). Every float option of a
command uses :func:`finite_float`; ranges are checked by the command's own validation, which names
both sides of a relation (``--target <= --tau``).
"""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A float option's value; NaN and infinities are refused with argparse's one-line error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
