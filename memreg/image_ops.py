"""Image preprocessing for training without torchvision (PIL + numpy + torch).

The ops reproduce torchvision's ``Resize(size)`` (shorter side to ``size``, bilinear),
``CenterCrop``, ``RandomCrop``, ``RandomHorizontalFlip``, ``ToTensor`` and
``Normalize([0.5], [0.5])`` as diffusers' text-to-image scripts chain them. Random choices take
an explicit ``numpy.random.Generator`` so a caller controls the stream.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from memreg.image_io import to_rgb


def resize_shorter(image: Image.Image, size: int, resample=Image.BILINEAR) -> Image.Image:
    """Resize so the shorter side is ``size`` (torchvision ``Resize(int)`` semantics)."""
    w, h = image.size
    if min(w, h) == size:
        return image
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return image.resize((new_w, new_h), resample=resample)


def crop_box_center(width: int, height: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return top, left


def crop_box_random(width: int, height: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a uniformly random ``size`` x ``size`` crop."""
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return top, left


def crop(image: Image.Image, top: int, left: int, size: int) -> Image.Image:
    return image.crop((left, top, left + size, top + size))


def hflip(image: Image.Image) -> Image.Image:
    return image.transpose(Image.FLIP_LEFT_RIGHT)


def to_tensor_normalized(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    arr = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()) * 2.0 - 1.0


def preprocess(image: Image.Image, resolution: int, center_crop: bool, flip: bool,
               rng: np.random.Generator | None = None) -> torch.Tensor:
    """Resize -> crop (center, or random from ``rng``) -> optional flip -> [-1, 1] tensor."""
    return preprocess_with_crop(image, resolution, center_crop, flip, rng)[0]


def preprocess_with_crop(image: Image.Image, resolution: int, center_crop: bool, flip: bool,
                         rng: np.random.Generator | None = None
                         ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """:func:`preprocess`, plus the image's (height, width) before resizing and the crop's (top,
    left) in the resized image (SDXL's size and crop conditioning)."""
    original = (image.size[1], image.size[0])
    image = resize_shorter(to_rgb(image), resolution)
    w, h = image.size
    if center_crop or rng is None:
        top, left = crop_box_center(w, h, resolution)
    else:
        top, left = crop_box_random(w, h, resolution, rng)
    image = crop(image, top, left, resolution)
    if flip:
        image = hflip(image)
    return to_tensor_normalized(image), original, (top, left)
