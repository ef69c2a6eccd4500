"""Prompt-adherence proxy for the demo's scenes: checks exactly what a caption names, nothing else.

Each pixel is snapped to the nearest palette colour. For a caption's ``named`` attributes:

* colour (always, and the second shape's colour for two-shape captions): at least ``min_area`` of the
  image (2 %, below any named shape, above the unnamed distractors) has that colour, and it is not
  the background colour (the median of the border);
* background (when named): the border's median colour is the named one;
* position (when named): the centroid of the named colour's pixels lies within 0.17 of the named spot.

Adherence of an image is the mean of its caption's checks. Unnamed content (distractors, unnamed
backgrounds and positions, size, stripes, lighting) is never checked, so a model that follows the
caption and fills the rest freely scores 1; one that ignores it scores ~0.2 (shuffled captions).
A photo scores by the colours it happens to hold (0.1-0.6; the colour wheel, which holds all,
0.93), so a copied photo is caught by the copy check, not here. Shapes are not checked: at 16 px a
5-pixel triangle and a 5-pixel disc cannot be told apart reliably. It needs no classifier, so it cannot inherit a
classifier's biases, and it is exact for the palette the scenes are drawn from.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from memreg.demo.data import COLORS, POSITIONS

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float32)
MIN_AREA = 0.02
POSITION_RADIUS = 0.17


def nearest_color(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb[None]) ** 2).sum(axis=1)))]


def palette_map(arr: np.ndarray) -> np.ndarray:
    """(H, W) indices into the palette of each pixel's nearest colour."""
    d = ((arr[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def scene_adherence(image: Image.Image, named: dict) -> dict:
    """The checks of one image against the attributes its caption names."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = arr.shape
    idx = palette_map(arr)
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    background = nearest_color(np.median(border, axis=0))
    checks: dict[str, float] = {}
    colors = [named["color"]] + ([named["pair"]["color"]] if "pair" in named else [])
    for k, c in enumerate(colors):
        mask = idx == _PALETTE_NAMES.index(c)
        checks[f"color{k}_ok"] = float(mask.mean() >= MIN_AREA and c != background)
    if "background" in named:
        checks["background_ok"] = float(background == named["background"])
    if "position" in named:
        mask = idx == _PALETTE_NAMES.index(named["color"])
        ok = False
        if mask.any():
            ys, xs = np.nonzero(mask)
            cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
            px, py = POSITIONS[named["position"]]
            ok = bool(np.hypot(cx - px, cy - py) <= POSITION_RADIUS)
        checks["position_ok"] = float(ok)
    return {"background": background, **checks, "adherence": float(np.mean(list(checks.values())))}


def mean_adherence(images: list[Image.Image], named: list[dict]) -> float:
    if len(images) != len(named):
        raise ValueError(f"{len(images)} images but {len(named)} captions")
    return float(np.mean([scene_adherence(i, n)["adherence"] for i, n in zip(images, named)]))
