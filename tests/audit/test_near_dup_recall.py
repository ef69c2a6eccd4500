"""Near-duplicate recall on planted copies of real photos (crops, flips, borders, JPEG, colour), demo
scenes that differ only in colour, and the pure helpers of the view rule, against hand-made answers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from memreg.audit.near_dup import (CODE_BYTES, DEFAULT_THRESHOLD, HASH_BYTES, HASH_MARGIN, INDEX_VIEWS,
                                   PLANTED_TRANSFORMS, QUERY_VIEWS, VIEWS, border_box, calibrate, colour_distance,
                                   colour_grid, near_pairs, near_pairs_bruteforce, phash_code, planted_copy,
                                   planted_kinds, upscaled, view_codes, view_distance, view_hash, view_match,
                                   window_boxes, work_image)
from memreg.demo.data import PHOTOS, Scene, Shape, load_photo, photo_variant, render_scene

# Distinct scikit-image photos bundled with the package (no download; ``cat`` is ``chelsea``).
RECALL_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
                 "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
                 "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text")
NEW_TRANSFORMS = ("crop_centre", "crop_offcentre", "jpeg", "brightness", "contrast", "pad", "resize", "hflip")
COPIES_PER_TRANSFORM = 2


# ----------------------------------------------------------------------------- pure helpers by hand

def test_border_box_trims_a_flat_frame_only():
    # content: a 12x16 checkerboard of 0/100 (every line's median 50, every pixel 50 off it)
    content = (np.indices((12, 16)).sum(axis=0) % 2 * 100).astype(np.uint8)
    padded = np.full((12 + 1 + 3, 16 + 2 + 0), 200, np.uint8)        # 1 top, 3 bottom, 2 left, 0 right
    padded[1:13, 2:18] = content
    # caps: int(16 * 0.25) = 4 rows, int(18 * 0.25) = 4 columns a side, none reached
    assert border_box(padded) == (2, 1, 18, 13)
    assert border_box(content) == (0, 0, 16, 12)                     # no border: nothing trimmed


def test_border_box_tolerance_and_cap():
    img = np.full((10, 10), 100, np.uint8)
    img[3:7, 3:7] = 0                                  # a dark 4x4 square on a flat 10x10 field
    img[0, 0] = 110                                    # within tolerance 10 of the top row's median 100
    # flat field: each side trims at most int(max_fraction 0.25 * 10) = 2 lines
    assert border_box(img) == (2, 2, 8, 8)
    assert border_box(img, max_fraction=0.5) == (3, 3, 7, 7)
    img[1, 5] = 150                                    # 50 levels off: row 1 is content now
    assert border_box(img, max_fraction=0.5) == (3, 1, 7, 7)


def test_window_boxes_by_hand():
    # 100x80 at 0.9: 90x72; slack 10 x 8 -> centre at (5, 4), corners at x 0 / 10, y 0 / 8
    assert window_boxes(100, 80, 0.9) == [(5, 4, 95, 76), (0, 0, 90, 72), (10, 0, 100, 72), (0, 8, 90, 80),
                                          (10, 8, 100, 80)]


def test_work_image_scales_the_shorter_side_down_only():
    big = Image.new("RGB", (512, 256), (10, 200, 30))
    assert work_image(big).size == (256, 128) and work_image(big).mode == "L"   # 256 -> 128: x 0.5
    assert work_image(Image.new("RGB", (100, 60))).size == (100, 60)
    assert work_image(big, mode="RGB").size == (256, 128) and work_image(big, mode="RGB").mode == "RGB"


def test_small_images_are_scaled_up_before_their_views():
    tiny = Image.new("RGB", (16, 8), (10, 200, 30))
    assert upscaled(tiny).size == (128, 64)                          # shorter side 8 -> 64: x 8
    big = Image.new("RGB", (64, 100))
    assert upscaled(big) is big                                      # 64 already: untouched
    # a 16-px image's windows are cut on its 64-px copy: 58 px (0.906), not 14 px (0.875)
    img = load_photo("coffee", 16)
    up = upscaled(work_image(img))                                   # 16 -> 64 px
    assert view_codes(img)[2, :HASH_BYTES].tolist() == view_hash(up.crop(window_boxes(64, 64)[0])).tolist()
    assert window_boxes(64, 64)[0] == (3, 3, 61, 61)
    native = view_codes(img, min_side=0)                             # never scaled up: the 14-px window
    assert native[2, :HASH_BYTES].tolist() == view_hash(work_image(img).crop(window_boxes(16, 16)[0])).tolist()
    assert window_boxes(16, 16)[0] == (1, 1, 15, 15)


def test_view_hash_is_phash_then_dhash():
    import imagehash

    img = load_photo("coffee", 64)
    h = view_hash(img)
    assert h.shape == (16,) and h[:8].tolist() == phash_code(img).tolist()
    assert h[8:].tolist() == np.packbits(imagehash.dhash(img).hash.reshape(-1)).tolist()


def test_views_layout():
    assert VIEWS[:2] == ("image", "mirror") and QUERY_VIEWS == (0, 1) and len(VIEWS) == 7
    assert 1 not in INDEX_VIEWS and 0 in INDEX_VIEWS
    img = load_photo("astronaut", 64)                 # no flat border: the image view is the whole image
    codes = view_codes(img)
    assert codes.shape == (len(VIEWS), CODE_BYTES) == (7, 64) and codes.dtype == np.uint8
    assert codes[0, :HASH_BYTES].tolist() == view_hash(work_image(img)).tolist()
    assert codes[0, HASH_BYTES:].tolist() == colour_grid(img).tolist()
    assert codes[1, HASH_BYTES:].tolist() == colour_grid(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).tolist()
    assert codes[3, HASH_BYTES:].tolist() == colour_grid(img.crop(window_boxes(64, 64)[1])).tolist()   # top left


# every image's colour grid uniform: even images (26, 26, 24), odd (41, 11, 24); 0.30 apart by hand
# (chromaticity (0, 0.04) vs (0.30, 0.04)), so only the first bound (hash <= threshold) can match
CELLS = ((26, 26, 24), (41, 11, 24))


def codes_of(*rows):
    """View codes (N, V, CODE_BYTES) from rows of one byte per view (the other hash bytes 0), colours
    :data:`CELLS` in turn."""
    out = np.zeros((len(rows), len(VIEWS), CODE_BYTES), np.uint8)
    for i, r in enumerate(rows):
        out[i, :, 0] = r
        out[i, :, HASH_BYTES:] = np.tile(np.array(CELLS[i % 2], np.uint8), (CODE_BYTES - HASH_BYTES) // 3)
    return out


def test_view_rule_compares_queries_with_index_views_only():
    # image 0: a window view equal to image 1's whole-image view -> a pair at distance 0
    # image 2: a window equal to image 3's window only (window vs window is never compared)
    # image 4: mirror equal to image 5's mirror only (mirror vs mirror is never compared)
    v = len(VIEWS)
    rows = [[0x00, 0x00] + [0xF0] * (v - 2), [0xF0, 0x0F] + [0x03] * (v - 2),
            [0x11, 0x22] + [0x77] * (v - 2), [0x88, 0x44] + [0x77] * (v - 2),
            [0x5A, 0xFF] + [0x5A] * (v - 2), [0xA5, 0xFF] + [0xA5] * (v - 2)]
    codes = codes_of(*rows)
    assert colour_distance(codes[0, 0, HASH_BYTES:], codes[1, 0, HASH_BYTES:]) == pytest.approx(0.30)
    # 0 vs 1: query 0 of image 1 (0xF0) against window of image 0 (0xF0) -> 0 bits
    assert view_distance(codes[0], codes[1]) == 0
    # 2 vs 3: queries 0x11, 0x22 / 0x88, 0x44 against index 0x88, 0x77 / 0x11, 0x77:
    # min(|0x11^0x88|=4, |0x11^0x77|=4, |0x22^0x88|=4, |0x22^0x77|=4, |0x88^0x11|, |0x88^0x77|=8, ...) = 4
    assert view_distance(codes[2], codes[3]) == 4
    # 4 vs 5: mirrors equal but not compared; 0x5A vs 0xA5 and 0xFF vs 0xA5 / 0x5A: 8, 4 -> 4
    assert view_distance(codes[4], codes[5]) == 4
    got = {tuple(p) for p in near_pairs(codes, 0)}
    assert (0, 1) in got and (2, 3) not in got and (4, 5) not in got
    # colours 0.30 apart: 4 bits match at threshold 4, and not at 3 (the second bound needs <= 0.15)
    assert (2, 3) in {tuple(p) for p in near_pairs(codes, 4)} and (2, 3) not in {tuple(p) for p in near_pairs(codes, 3)}
    assert view_match(codes[2], codes[3], 4) and not view_match(codes[2], codes[3], 3)
    for t in (0, 3, 4, 8):
        assert {tuple(p) for p in near_pairs(codes, t)} == {tuple(p) for p in near_pairs_bruteforce(codes, t)}


def test_near_pairs_views_against_bruteforce():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, size=(300, len(VIEWS), CODE_BYTES), dtype=np.uint8)
    codes[7, 2] = codes[3, 0]
    codes[7, 2, 0] ^= np.uint8(0b1)                    # a window of 7 one bit from the image of 3, same colours
    codes[11, 4] = codes[5, 1]                         # a window of 11 = the mirror of 5 but for 30 hash bits
    codes[11, 4, :HASH_BYTES] ^= np.array([0xFF] * 3 + [0x3F] + [0] * 12, np.uint8)   # 8 + 8 + 8 + 6
    codes[13, 0, :HASH_BYTES] = codes[17, 3, :HASH_BYTES]   # equal hashes, the random colour grids apart:
    assert colour_distance(codes[13, 0, HASH_BYTES:], codes[17, 3, HASH_BYTES:]) > 0.6
    for t in (1, 18, 24, 36):
        fast = {tuple(p) for p in near_pairs(codes, t)}
        assert fast == {tuple(p) for p in near_pairs_bruteforce(codes, t)}
        assert (3, 7) in fast and (13, 17) not in fast
        assert ((5, 11) in fast) == (t + HASH_MARGIN >= 30)   # the second bound: same colours, t + 12 bits


def test_planted_kinds_rotate():
    t = ("a", "b", "c", "d", "e")
    # image k gets transforms 2k, 2k+1 (mod 5): ab, cd, ea, bc
    assert planted_kinds(4, t, 2) == [("a", "b"), ("c", "d"), ("e", "a"), ("b", "c")]
    assert planted_kinds(2, t, None) == [t, t] == planted_kinds(2, t, 9)


def test_new_planted_copies_by_size():
    img = load_photo("coffee", 100)
    rng = np.random.default_rng(0)
    assert planted_copy(img, "crop_centre", rng).size == (100, 100)
    assert planted_copy(img, "hflip", rng).tobytes() == img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes()
    w, h = planted_copy(img, "pad", rng).size
    assert 104 <= max(w, h) <= 110 and min(w, h) >= 100
    assert all(t in PLANTED_TRANSFORMS for t in NEW_TRANSFORMS)


# ----------------------------------------------------------------------------- the planted set

@pytest.fixture(scope="module")
def planted():
    """(codes (N, V, CODE_BYTES), owner per code, transform per code; originals first)."""
    originals = [load_photo(n, 128) for n in RECALL_PHOTOS]
    rng = np.random.default_rng(19)
    codes = [view_codes(o) for o in originals]
    owner, kind = list(range(len(originals))), ["original"] * len(originals)
    for k, o in enumerate(originals):
        for t in NEW_TRANSFORMS:
            for _ in range(COPIES_PER_TRANSFORM):
                codes.append(view_codes(planted_copy(o, t, rng)))
                owner.append(k)
                kind.append(t)
    return np.stack(codes), np.array(owner), np.array(kind)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[1]


def test_recall_over_planted_transforms(planted):
    codes, owner, kind = planted
    n_orig = len(RECALL_PHOTOS)
    copies = np.flatnonzero(kind != "original")
    hit = view_match(codes[copies], codes[owner[copies]], DEFAULT_THRESHOLD)
    recall = {t: float(np.mean(hit[kind[copies] == t])) for t in NEW_TRANSFORMS}
    # the target, per transformation: off-centre crops (half of them in a corner, 5-15% cut off both
    # axes) were 0.77-0.91 over seeds 1, 2, 19 on the hash alone; with the colour grid's second bound
    # 0.977-1.0 (1.0 at this seed)
    assert min(recall.values()) >= 0.95, recall
    for t in ("jpeg", "brightness", "contrast", "hflip"):
        assert recall[t] == 1.0, recall
    # the clusters the audit would form: every copy with its own original, never two originals together
    comp = components(len(codes), near_pairs(codes, DEFAULT_THRESHOLD))
    assert len(set(comp[:n_orig])) == n_orig
    assert float(np.mean(comp[copies] == comp[owner[copies]])) >= 0.95


def test_no_distinct_originals_matched(planted):
    codes, owner, kind = planted
    orig = codes[kind == "original"]
    iu = np.triu_indices(len(orig), 1)
    d = view_distance(orig[iu[0]], orig[iu[1]])
    assert d.min() > DEFAULT_THRESHOLD, d.min()
    assert not view_match(orig[iu[0]], orig[iu[1]]).any()
    # and no copy is matched to another original
    cross = view_match(codes[kind != "original"][:, None], orig[None])
    other = owner[kind != "original"][:, None] != np.arange(len(orig))[None]
    assert not cross[other].any()
    # no pair of copies of different photos either: two grey photos (all chromaticity 0) 34 hash bits
    # apart were matched by colour alone; the light pattern of the second bound keeps them apart
    pairs = near_pairs(codes, DEFAULT_THRESHOLD)
    assert not np.any(owner[pairs[:, 0]] != owner[pairs[:, 1]])


# moon is a low-contrast texture: at 16 px its crops differ by 37-46 hash bits (recall 0.22-0.42 on
# the crops measured for the README), like the textures the demo leaves out of its photos
# (memreg.demo.data.PHOTOS)
DEMO_CROP_PHOTOS = tuple(p for p in PHOTOS if p != "moon")


def test_the_demo_worlds_16px_crops_join_their_photo():
    # the web world's near-duplicate crops (88-95% of the side anywhere in the full photo, resized to
    # 16 px), 24 a photo: 0.989 (coffee 0.875, the rest 1.0); before small images were scaled up
    # 0.947 (coffee 0.625, coins 0.875, logo 0.917)
    rng = np.random.default_rng(100)
    originals = np.stack([view_codes(load_photo(n, 16)) for n in DEMO_CROP_PHOTOS])
    crops = np.stack([view_codes(photo_variant(n, 16, "crop", rng)) for n in DEMO_CROP_PHOTOS for _ in range(24)])
    owner = np.repeat(np.arange(len(DEMO_CROP_PHOTOS)), 24)
    hit = view_match(crops, originals[owner])
    per_photo = {n: float(hit[owner == k].mean()) for k, n in enumerate(DEMO_CROP_PHOTOS)}
    assert float(hit.mean()) >= 0.95 and min(per_photo.values()) >= 0.8, per_photo
    codes = np.concatenate([originals, crops])
    who = np.concatenate([np.arange(len(DEMO_CROP_PHOTOS)), owner])
    pairs = near_pairs(codes, DEFAULT_THRESHOLD)
    assert not np.any(who[pairs[:, 0]] != who[pairs[:, 1]])          # no two photos joined


def demo_scene(colour: str, noise_seed: int) -> Image.Image:
    """A 16-px demo scene drawn by hand (memreg.demo.data): a ``colour`` circle and a small green
    square on yellow; only the circle's colour and the pixel noise vary."""
    scene = Scene((Shape("circle", colour, 0.5, 0.5, 0.2), Shape("square", "green", 0.25, 0.75, 0.06)),
                  "yellow", 1.0, 0.04)
    return render_scene(scene, 16, np.random.default_rng(noise_seed))


def test_demo_scenes_differing_only_in_colour_are_not_paired():
    # red (220, 40, 40) and purple (140, 50, 170) have almost the same grey level (94 vs 91): the
    # grey hashes of the two scenes are a few bits apart, their colour grids are not
    red, red_again, purple = (view_codes(demo_scene(c, s)) for c, s in (("red", 0), ("red", 1), ("purple", 0)))
    assert view_distance(red, purple) <= 4
    assert colour_distance(red[0, HASH_BYTES:], purple[0, HASH_BYTES:]) > 0.6
    assert not view_match(red, purple)
    # the same scene with other pixel noise is still a copy
    assert view_match(red, red_again)
    assert {tuple(p) for p in near_pairs(np.stack([red, red_again, purple]), DEFAULT_THRESHOLD)} == {(0, 1)}


def test_calibration_covers_the_new_transforms():
    images = [load_photo(n, 64) for n in RECALL_PHOTOS[:10]]
    cal = calibrate(images, DEFAULT_THRESHOLD, seed=1, per_image=4)
    assert cal.copies == 40                              # 4 per image
    # 10 transforms taken 4 at a time over 10 images: each planted 40 / 10 = 4 times
    assert set(cal.recall_by_transform) == set(PLANTED_TRANSFORMS)
    assert cal.precision == 1.0 and cal.recall >= 0.9, cal
