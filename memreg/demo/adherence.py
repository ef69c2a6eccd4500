"""Prompt-adherence proxy for the demo's procedural scenes.

A caption "a red circle on a blue background, top left" names a shape colour, a background colour
and a position. For a generated image we read the median colour of a small patch at the named
position and the median colour of the image border, snap each to the nearest palette colour, and
score 1 for each that matches the caption (adherence = mean of the two checks). Generations that
ignore the prompt, or copy a memorized photo, score near chance (1/8 per check); real scenes score
~1.0. It needs no classifier, so it cannot inherit a classifier's biases, and it is exact for the
palette the scenes are drawn from.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from memreg.demo.data import COLORS, POSITIONS, Scene

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float32)


def nearest_color(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb[None]) ** 2).sum(axis=1)))]


def scene_adherence(image: Image.Image, scene: Scene) -> dict:
    """Checks of one image against its scene: shape colour at the position, background colour."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = arr.shape
    cx, cy = POSITIONS[scene.position]
    x, y = int(round(cx * w - 0.5)), int(round(cy * h - 0.5))
    half = max(1, int(round(0.06 * min(h, w))))
    patch = arr[max(0, y - half):y + half + 1, max(0, x - half):x + half + 1].reshape(-1, 3)
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    shape_color = nearest_color(np.median(patch, axis=0))
    background = nearest_color(np.median(border, axis=0))
    shape_ok = float(shape_color == scene.color)
    bg_ok = float(background == scene.background)
    return {"shape_color": shape_color, "background": background, "shape_ok": shape_ok,
            "background_ok": bg_ok, "adherence": (shape_ok + bg_ok) / 2}


def mean_adherence(images: list[Image.Image], scenes: list[Scene]) -> float:
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    return float(np.mean([scene_adherence(i, s)["adherence"] for i, s in zip(images, scenes)]))
