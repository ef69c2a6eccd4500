"""Audit fixtures: photos bundled with scikit-image and a small imagefolder with planted copies."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "horse", "clock", "brick")


def photo(name: str, side: int = 64) -> Image.Image:
    """A scikit-image sample photo as an RGB square of ``side`` px."""
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return Image.fromarray(a[..., :3].astype(np.uint8)).resize((side, side), Image.BICUBIC)


def jpeg(img: Image.Image, quality: int = 40) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


# Rows of the small imagefolder, by hand: (file, image, caption). Known answer:
#   rows 0-2 the same astronaut pixels, row 3 its JPEG re-encode  -> one cluster of 4 (2 distinct images)
#   rows 4-5 coffee and a 0.75x resized coffee                    -> one cluster of 2
#   rows 6-11 other photos, once each; row 12 an unreadable file
#   captions: rows 6 and 7 repeat after normalisation only ("A photo of a cat." / "a photo of a cat")
def folder_rows():
    astro, coffee = photo("astronaut"), photo("coffee")
    rows = [("a0.png", astro, "an astronaut"), ("a1.png", astro, "an astronaut"), ("a2.png", astro, "an astronaut"),
            ("a3.jpg", jpeg(astro), "an astronaut in a suit"),
            ("c0.png", coffee, "a cup of coffee"), ("c1.png", coffee.resize((48, 48), Image.BICUBIC), "coffee"),
            ("p6.png", photo("chelsea"), "A photo of a cat."), ("p7.png", photo("rocket"), "a photo of a cat")]
    rows += [(f"p{8 + k}.png", photo(n), f"photo {n}") for k, n in enumerate(("camera", "coins", "moon", "clock"))]
    rows.append(("bad.png", None, "a broken file"))
    return rows


def write_folder(root: Path, rows) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.jsonl").open("w") as f:
        for name, img, cap in rows:
            if img is None:
                (root / name).write_bytes(b"this is not an image")
            else:
                img.save(root / name)
            f.write(json.dumps({"file_name": name, "caption": cap}) + "\n")
    return root


@pytest.fixture(scope="session")
def audit_folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("audit_data") / "train", folder_rows())


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: multi-process (accelerate launch --cpu) run, < 60 s")
