"""Near-duplicate images: 64-bit perceptual hashes searched with a faiss multi-index hash.

* **Hash**: ``imagehash.phash`` (DCT of a 32x32 greyscale thumbnail, 8x8 low frequencies
  thresholded at their median), packed to 8 bytes. Resizing, JPEG re-encoding and colour jitter
  move it by a few bits; a small crop by a few more.
* **Search**: two images are near-duplicates when the Hamming distance of their hashes is
  ``<= threshold``. ``faiss.IndexBinaryMultiHash`` splits the 64 bits into ``NHASH`` substrings of
  16 bits, each a hash table; a query probes every bucket within ``nflip`` bit flips of each of its
  substrings. By pigeonhole, two codes at distance ``d`` have some substring at distance
  ``<= floor(d / NHASH)``, so ``nflip = floor(threshold / NHASH)`` finds *every* pair within the
  threshold (no approximation) while a query touches only its buckets, not all N codes.
* **Calibration**: :func:`calibrate` plants copies of given images (resize, JPEG re-encode, small
  crop, colour jitter) and measures, at a threshold, the recall (copy within threshold of its
  original) and precision (pairs within threshold that are truly copies of one another).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

HASH_BYTES = 8                 # 64-bit pHash
NHASH = 4                      # substrings (hash tables) of the multi-index hash
DEFAULT_THRESHOLD = 10         # bits of 64; from calibrate() on scikit-image photos (see tests/test_near_dup.py)
PLANTED_TRANSFORMS = ("resize", "jpeg", "crop", "jitter")


def phash_code(image: Image.Image) -> np.ndarray:
    """The 64-bit pHash of ``image`` as 8 packed bytes (uint8, shape (8,))."""
    import imagehash

    return np.packbits(imagehash.phash(image, hash_size=8).hash.reshape(-1))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance between packed codes along the last axis (broadcasts)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)


def near_pairs(codes: np.ndarray, threshold: int) -> np.ndarray:
    """All pairs (i, j), i < j, of rows of ``codes`` (N, 8) within ``threshold`` bits; shape (P, 2).

    Exact (see module doc) but sub-quadratic: faiss's multi-index hash, not all pairs.
    """
    import faiss

    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if threshold < 0 or len(codes) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    index = faiss.IndexBinaryMultiHash(HASH_BYTES * 8, NHASH, HASH_BYTES * 8 // NHASH)
    index.nflip = int(threshold) // NHASH
    index.add(codes)
    lims, _, ids = index.range_search(codes, int(threshold) + 1)  # faiss keeps distances < radius
    q = np.repeat(np.arange(len(codes), dtype=np.int64), np.diff(lims).astype(np.int64))
    ids = ids.astype(np.int64)
    keep = q < ids
    return np.stack([q[keep], ids[keep]], axis=1)


def near_pairs_bruteforce(codes: np.ndarray, threshold: int, block: int = 1024) -> np.ndarray:
    """The same pairs as :func:`near_pairs` by comparing all N^2/2 pairs (reference and benchmark)."""
    words = np.ascontiguousarray(codes, dtype=np.uint8).view(np.uint64).ravel()  # one 64-bit word per code
    out = [np.zeros((0, 2), dtype=np.int64)]
    for lo in range(0, len(words), block):
        d = np.bitwise_count(np.bitwise_xor(words[lo:lo + block, None], words[None, :]))
        i, j = np.nonzero(d <= threshold)
        i = i + lo
        keep = i < j
        out.append(np.stack([i[keep], j[keep]], axis=1).astype(np.int64))
    return np.concatenate(out)


# ----------------------------------------------------------------------------- planted copies

def planted_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """One modified copy of ``image``: resize (0.5-0.8x), jpeg (quality 30-70), crop (2-5% off
    each side) or jitter (brightness/contrast/saturation x0.8-1.2)."""
    img = image.convert("RGB")
    w, h = img.size
    if kind == "resize":
        s = rng.uniform(0.5, 0.8)
        return img.resize((max(8, round(w * s)), max(8, round(h * s))), Image.BICUBIC)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(30, 71)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "crop":
        f = rng.uniform(0.02, 0.05, size=4)
        box = (round(w * f[0]), round(h * f[1]), w - round(w * f[2]), h - round(h * f[3]))
        return img.crop(box)
    if kind == "jitter":
        for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enh(img).enhance(rng.uniform(0.8, 1.2))
        return img
    raise ValueError(f"unknown planted copy {kind!r}; choose one of {PLANTED_TRANSFORMS}")


@dataclass
class Calibration:
    """Recall/precision of the near-duplicate rule at ``threshold`` on planted copies."""

    threshold: int
    images: int                     # originals
    copies: int                     # planted copies (one per original and transform)
    recall: float                   # copies within threshold of their original
    recall_by_transform: dict[str, float]
    precision: float                # pairs within threshold that share an original
    pairs_found: int
    copy_distance_p95: float        # 95th percentile of copy-to-original distances (bits)
    other_distance_p01: float       # 1st percentile of distances between different originals

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def calibrate(images: list[Image.Image], threshold: int = DEFAULT_THRESHOLD, seed: int = 0,
              transforms: tuple[str, ...] = PLANTED_TRANSFORMS) -> Calibration:
    """Plant one copy of each image per transform and measure the rule at ``threshold``.

    Precision counts every pair of the originals-plus-copies set found within the threshold
    (via :func:`near_pairs`); a pair is correct when both come from the same original.
    """
    if len(images) < 2:
        raise ValueError("calibration needs at least 2 distinct images")
    rng = np.random.default_rng(seed)
    codes, owner, kind = [], [], []
    for k, img in enumerate(images):
        codes.append(phash_code(img))
        owner.append(k)
        kind.append("original")
        for t in transforms:
            codes.append(phash_code(planted_copy(img, t, rng)))
            owner.append(k)
            kind.append(t)
    codes_a, owner_a, kind_a = np.stack(codes), np.array(owner), np.array(kind)
    orig = np.flatnonzero(kind_a == "original")
    copies = np.flatnonzero(kind_a != "original")
    d_copy = hamming(codes_a[copies], codes_a[orig[owner_a[copies]]])
    hit = d_copy <= threshold
    pairs = near_pairs(codes_a, threshold)
    correct = int(np.sum(owner_a[pairs[:, 0]] == owner_a[pairs[:, 1]])) if len(pairs) else 0
    d_other = hamming(codes_a[orig][:, None, :], codes_a[orig][None, :, :])[np.triu_indices(len(orig), 1)]
    return Calibration(
        threshold=int(threshold), images=len(images), copies=len(copies), recall=float(hit.mean()),
        recall_by_transform={t: float(hit[kind_a[copies] == t].mean()) for t in transforms},
        precision=float(correct / len(pairs)) if len(pairs) else 1.0, pairs_found=int(len(pairs)),
        copy_distance_p95=float(np.percentile(d_copy, 95)),
        other_distance_p01=float(np.percentile(d_other, 1)) if d_other.size else float("nan"))
