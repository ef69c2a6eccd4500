"""memreg.audit.near_dup: hashes, colour grids and the match rule by hand, faiss search (exact, against all
pairs), planted-copy calibration."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from memreg.audit.near_dup import (CODE_BYTES, COLOUR_BOUND, COLOUR_BYTES, DEFAULT_THRESHOLD, HASH_BYTES, HASH_MARGIN,
                                   LUMA_BOUND, PLANTED_TRANSFORMS, TIGHT_COLOUR_BOUND, calibrate, chromaticity,
                                   colour_distance,
                                   colour_grid, hamming, luma_distance, near_match, near_pairs, near_pairs_bruteforce,
                                   phash_code, planted_copy, view_match)

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


def test_chromaticity_by_hand():
    # s = R + G + B + 24: (40, 20, 16) -> s 100, c1 = 20/100, c2 = (60 - 32)/100; black -> 0, 0
    c = chromaticity(np.array([40, 20, 16, 0, 0, 0], np.uint8))
    assert c.shape == (2, 2)
    assert np.allclose(c, [[0.20, 0.28], [0.0, 0.0]])


def test_colour_distance_of_two_cell_grids_by_hand():
    a = np.array([40, 20, 16, 0, 0, 0], np.uint8)       # cells: (0.20, 0.28), (0, 0)
    b = np.array([26, 26, 24, 76, 0, 0], np.uint8)      # cells: (0, 4/100), (76/100, 76/100)
    # cell 1: |0.20 - 0| + |0.28 - 0.04| = 0.44; cell 2: 0.76 + 0.76 = 1.52; the view: the largest
    assert colour_distance(a, b) == pytest.approx(1.52)
    assert colour_distance(a[:3], b[:3]) == pytest.approx(0.44)
    assert colour_distance(a, a) == 0.0
    # a brightness change keeps the chromaticity: (40, 20, 16) x 1.5 = (60, 30, 24), s 138:
    # c1 = 30/138, c2 = 42/138 -> |0.2174 - 0.20| + |0.3043 - 0.28| = 0.0417
    assert colour_distance(a[:3], np.array([60, 30, 24], np.uint8)) == pytest.approx(30 / 138 - 0.2 + 42 / 138 - 0.28)
    # broadcasting: (2, 6) against (6,)
    assert colour_distance(np.stack([a, b]), b).tolist() == pytest.approx([1.52, 0.0])


def test_luma_distance_by_hand():
    # grey levels (R+G+B)/3 of two cells: a 0 and 40 (mean 20, std 20), b 0 and 80 (mean 40, std 40)
    a = np.array([0, 0, 0, 40, 40, 40], np.uint8)
    b = np.array([0, 0, 0, 80, 80, 80], np.uint8)
    # z = (L - mean) / (std + 8): a -20/28, 20/28; b -40/48, 40/48; largest |dz| = 40/48 - 20/28
    assert luma_distance(a, b) == pytest.approx(40 / 48 - 20 / 28)
    assert luma_distance(a, a[::-1].copy()) == pytest.approx(40 / 28)   # the light cell moved
    flat = np.full(6, 128, np.uint8)
    assert luma_distance(flat, flat + 1) == 0.0                          # a flat view has no pattern


def test_near_match_at_its_boundaries():
    t = DEFAULT_THRESHOLD
    assert (COLOUR_BOUND, HASH_MARGIN, TIGHT_COLOUR_BOUND) == (0.6, 12, 0.15)
    assert CODE_BYTES == HASH_BYTES + COLOUR_BYTES == 16 + 48
    # first bound: hash <= t and colour <= 0.6 (light pattern not asked)
    assert near_match(t, COLOUR_BOUND, 99.0, t)
    assert not near_match(t + 1, COLOUR_BOUND, 0.0, t)
    assert not near_match(t, 0.61, 99.0, t)
    # second bound: hash <= t + 12, colour <= 0.15 and light <= LUMA_BOUND
    assert near_match(t + HASH_MARGIN, TIGHT_COLOUR_BOUND, LUMA_BOUND, t)
    assert not near_match(t + HASH_MARGIN + 1, 0.0, 0.0, t)
    assert not near_match(t + 1, 0.16, 0.0, t)
    assert not near_match(t + 1, 0.0, LUMA_BOUND + 0.01, t)
    # the threshold moves both hash bounds; elementwise on arrays
    assert near_match(np.array([10, 11, 22, 23]), np.array([0.5, 0.5, 0.1, 0.1]), 0.0, 10).tolist() == \
        [True, False, True, False]


def test_colour_grid_is_cell_means():
    a = np.zeros((8, 8, 3), np.uint8)
    a[:, :4] = (200, 0, 0)                               # left half red, right half blue
    a[:, 4:] = (0, 0, 200)
    a[0:2, 0:2, 1] = [[10, 20], [30, 40]]                # top-left cell's green: mean 25
    g = colour_grid(Image.fromarray(a)).reshape(4, 4, 3)
    assert g[0, 0].tolist() == [200, 25, 0]
    assert g[:, 1].tolist() == [[200, 0, 0]] * 4 and g[:, 2:].reshape(-1, 3).tolist() == [[0, 0, 200]] * 8


def coloured(hash_row: np.ndarray, cell: tuple[int, int, int]) -> np.ndarray:
    """A view code: ``hash_row`` (HASH_BYTES) then every cell of the colour grid ``cell``."""
    return np.concatenate([hash_row, np.tile(np.array(cell, np.uint8), COLOUR_BYTES // 3)])


def test_near_pairs_with_colour_both_bounds():
    rng = np.random.default_rng(0)
    t = DEFAULT_THRESHOLD
    h = rng.integers(0, 256, size=(8, 16), dtype=np.uint8)
    spread = list(range(0, 128, 4)) + list(range(1, 128, 4))     # bits over all 16 bytes
    # (0, 1) at t bits, colours 0.30 apart: first bound   (2, 3) at t + 1 bits, same 0.30: refused
    # (4, 5) at t + 12 bits, same colour: second bound    (6, 7) at t + 13 bits, same colour: refused
    pairs = {(0, 1): (t, (41, 11, 24)), (2, 3): (t + 1, (41, 11, 24)), (4, 5): (t + HASH_MARGIN, (26, 26, 24)),
             (6, 7): (t + HASH_MARGIN + 1, (26, 26, 24))}
    codes = np.zeros((8, 1, CODE_BYTES), np.uint8)
    for (i, j), (bits, cell) in pairs.items():
        codes[i, 0] = coloured(h[i], (26, 26, 24))              # (26, 26, 24) vs (41, 11, 24): 0.30 by hand
        codes[j, 0] = coloured(flip_bits(h[i], spread[:bits]), cell)
        assert hamming(codes[i, 0, :16], codes[j, 0, :16]) == bits
    assert colour_distance(codes[0, 0, 16:], codes[1, 0, 16:]) == pytest.approx(0.30)
    got = {tuple(p) for p in near_pairs(codes, t, (0,), (0,))}
    assert {(0, 1), (4, 5)} <= got and not got & {(2, 3), (6, 7)}
    assert got == {tuple(p) for p in near_pairs_bruteforce(codes, t, (0,), (0,))}
    assert view_match(codes[4], codes[5], t, (0,), (0,)) and not view_match(codes[6], codes[7], t, (0,), (0,))


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


def test_view_codes_survive_their_hex_text():
    from memreg.audit.near_dup import codes_from_hex, codes_hex, view_codes
    img = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    assert np.array_equal(codes_from_hex(codes_hex(img)), view_codes(img))
