"""memreg.audit.near_dup: hashes, faiss search (exact, against all pairs), planted-copy calibration."""

from __future__ import annotations

import numpy as np
import pytest

from memreg.audit.near_dup import (DEFAULT_THRESHOLD, PLANTED_TRANSFORMS, calibrate, hamming, near_pairs,
                                   near_pairs_bruteforce, phash_code, planted_copy)

from .conftest import PHOTOS, photo


def flip_bits(code: np.ndarray, bits: list[int]) -> np.ndarray:
    out = code.copy()
    for b in bits:
        out[b // 8] ^= np.uint8(1 << (b % 8))
    return out


def test_hamming_by_hand():
    a = np.zeros(8, np.uint8)
    b = np.array([0xFF, 0x01, 0, 0, 0, 0, 0, 0x80], np.uint8)
    assert hamming(a, b) == 8 + 1 + 1
    assert hamming(b, b) == 0


def test_phash_code_is_64_bits_and_stable_under_jpeg():
    img = photo("astronaut")
    code = phash_code(img)
    assert code.shape == (8,) and code.dtype == np.uint8
    assert hamming(code, phash_code(img.copy())) == 0


@pytest.mark.parametrize("threshold", [0, 3, 4, 7, 10, 11])
def test_near_pairs_finds_exactly_the_planted_pairs(threshold):
    rng = np.random.default_rng(threshold)
    codes = rng.integers(0, 256, size=(400, 8), dtype=np.uint8)
    # plant neighbours of row 0 at distances threshold (found) and threshold + 1 (not found), bits
    # spread over all four 16-bit substrings: the worst case for the multi-index hash
    spread = [s * 16 + k for k in range(16) for s in range(4)]
    codes[1] = flip_bits(codes[0], spread[:threshold])
    codes[2] = flip_bits(codes[0], spread[:threshold + 1])
    got = {tuple(p) for p in near_pairs(codes, threshold)}
    assert (0, 1) in got and (0, 2) not in got
    assert got == {tuple(p) for p in near_pairs_bruteforce(codes, threshold)}


def test_near_pairs_edge_cases():
    assert near_pairs(np.zeros((1, 8), np.uint8), 5).shape == (0, 2)
    assert {tuple(p) for p in near_pairs(np.zeros((3, 8), np.uint8), 0)} == {(0, 1), (0, 2), (1, 2)}


def test_planted_copies_change_the_image():
    img = photo("coffee", 100)
    rng = np.random.default_rng(0)
    assert planted_copy(img, "resize", rng).size[0] <= 80
    w, h = planted_copy(img, "crop", rng).size
    assert 90 <= w < 100 and 90 <= h < 100
    assert np.asarray(planted_copy(img, "jitter", rng)).tolist() != np.asarray(img).tolist()
    with pytest.raises(ValueError, match="unknown planted copy"):
        planted_copy(img, "rotate", rng)


def test_calibration_on_photos():
    images = [photo(n, 128) for n in PHOTOS]
    cal = calibrate(images, DEFAULT_THRESHOLD, seed=0)
    assert cal.copies == len(images) * len(PLANTED_TRANSFORMS)
    # pHash is built for these: resize, JPEG and mild colour changes keep it within a few bits
    for t in ("resize", "jpeg", "jitter"):
        assert cal.recall_by_transform[t] == 1.0, cal
    assert cal.precision >= 0.9, cal
    strict = calibrate(images, 0, seed=0)
    assert strict.recall <= cal.recall
