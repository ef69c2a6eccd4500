"""Near-duplicate images: several views per image, each a 128-bit perceptual hash plus a colour
grid; searched with faiss on the hashes, then checked on the colours.

* **Hash** of a view: ``imagehash.phash`` (DCT of a 32x32 greyscale thumbnail, 8x8 low
  frequencies thresholded at their median) followed by ``imagehash.dhash`` (signs of horizontal
  differences of a 9x8 thumbnail), 64 bits each, packed to :data:`HASH_BYTES`; the hash distance of
  two views is the Hamming distance over all 128 bits, i.e. the sum of the two hashes' distances.
  Resizing, JPEG re-encoding and colour changes move both by a few bits. Each hash alone confuses
  images the other tells apart: pHash confuses small flat scenes with the same layout (the demo
  world), dHash is noise on them and moves under JPEG; a small sum needs both to be close.
* **Colour** of a view: the mean RGB of each cell of a :data:`COLOUR_GRID` x :data:`COLOUR_GRID`
  grid over the same view box, cut from an RGB copy of the work image (uint8 means). Its distance
  (:func:`colour_distance`): per cell the chromaticity ``c1 = (R-G)/(R+G+B+24)``,
  ``c2 = (R+G-2B)/(R+G+B+24)`` (:func:`chromaticity`; brightness and contrast changes leave it
  nearly unchanged, the +24 keeps dark cells from exploding), cell distance ``|dc1| + |dc2|``,
  the view's distance the largest over the cells. Grey hashes cannot see colour: two scenes that
  differ only in a shape's colour have equal hashes and far-apart colour grids.
* **Code** of an image (:func:`view_codes`): uint8 ``(len(VIEWS), CODE_BYTES)``, per view the
  hash (bytes ``0..HASH_BYTES-1``) then the colour grid (the remaining ``3 * COLOUR_GRID**2``).
* **Views** (:data:`VIEWS`): the image, scaled to at most :data:`WORK_SIDE` px on its shorter
  side, with its uniform border trimmed (:func:`border_box`), then scaled up to at least
  :data:`MIN_WORK_SIDE` (:func:`upscaled`); its horizontal mirror; and five
  windows keeping :data:`WINDOW_SCALE` of each side (centre and four corners,
  :func:`window_boxes`). A crop keeping 85-95% of the side looks like one of the windows, a
  flipped copy like the mirror, a padded copy (trimmed) like the original. Windows are cut on
  whole pixels, so a small image is scaled up first: at 16 px a 0.9 window would be 14 px (0.875
  of the side) with its corners 2 px (12%) from the centre's, too coarse to meet a crop's place.
* **Rule** (:func:`near_match`): two images are near-duplicates when, for some *query* view of one
  (the image or its mirror) and *index* view of the other (the image or one of its windows), the
  hash distance is at most ``threshold`` bits and the colour distance at most
  :data:`COLOUR_BOUND`, or the hash distance is at most ``threshold +`` :data:`HASH_MARGIN` and the
  colour distance at most :data:`TIGHT_COLOUR_BOUND` and the light-pattern distance
  (:func:`luma_distance`) at most :data:`LUMA_BOUND`. An off-centre crop moves the hash of its best
  window past ``threshold`` but keeps its colours and where it is light or dark: the wider hash
  bound recovers it only where both agree closely, which different images rarely do. The light
  pattern is needed because every grey image has chromaticity 0: with colour alone, two different
  grey photos 34 bits apart (``cell`` and a padded ``shepp_logan_phantom``) were merged.
  Windows are never compared with windows, nor mirrors with mirrors: each extra comparison is
  another chance for two different images to collide, and a single crop/flip/pad needs none of
  them. Codes without a colour part (a plain 8-byte pHash, :data:`PLAIN_RULE`) match on
  ``hash <= threshold`` alone.
* **Search**: faiss's compiled brute force (``IndexBinaryFlat.range_search``) of the query views'
  hashes of all images against the index views' hashes of all images, at radius
  ``threshold + HASH_MARGIN`` (the candidates), then the rule's colour and light tests on the
  candidates (numpy, vectorised); exact: every pair the rule accepts is found.
* **Calibration**: :func:`calibrate` plants copies of given images (:data:`PLANTED_TRANSFORMS`) and
  measures, at a threshold, the recall (copy matched to its original under the rule) and
  precision (pairs matched that are truly copies of one another).

No colour-statistics library in the environment is worth adding for this: PIL's box filter and
numpy give the grid means and their distances.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from memreg.image_io import load_rgb

HASH_BYTES = 16                # a view's hash: 64-bit pHash + 64-bit dHash
COLOUR_GRID = 4                # a view's colour: mean RGB of COLOUR_GRID x COLOUR_GRID cells
COLOUR_BYTES = 3 * COLOUR_GRID * COLOUR_GRID
CODE_BYTES = HASH_BYTES + COLOUR_BYTES   # a view's code: hash, then colour grid (64 bytes)
CHROMA_OFFSET = 24             # added to R+G+B in the chromaticity: dark cells' noise stays small
DEFAULT_THRESHOLD = 22         # hash bits of 128 for a match; calibrated on scikit-image photos, demo scenes (README)
COLOUR_BOUND = 0.6             # a hash-close pair is refused only when some cell's colour clearly differs
HASH_MARGIN = 12               # hash bits past the threshold an off-centre crop's best window may sit at ...
TIGHT_COLOUR_BOUND = 0.15      # ... when every cell's colour agrees this closely (copies do; other images rarely)
LUMA_BOUND = 1.5               # ... and the cells' light pattern too: grey images all have chromaticity 0
LUMA_EPS = 8.0                 # grey levels added to a view's cell spread, so a flat view's pattern stays small
WORK_SIDE = 128                # views are cut from the image scaled to at most this shorter side ...
MIN_WORK_SIDE = 64             # ... and, after its border is trimmed, to at least this one
WINDOW_SCALE = 0.9             # windows keep this fraction of each side
BORDER_TOLERANCE = 10          # grey levels a border pixel may differ from its line's median
BORDER_MAX_FRACTION = 0.25     # at most this fraction of the side is trimmed from each side
WINDOWS = ("centre", "top_left", "top_right", "bottom_left", "bottom_right")
VIEWS = ("image", "mirror") + WINDOWS
QUERY_VIEWS = (0, 1)           # the image and its mirror ...
INDEX_VIEWS = (0,) + tuple(range(2, len(VIEWS)))  # ... against the image and its windows
CALIBRATION_COPIES = 4         # planted copies per calibration image in the audit (transforms in turn)
PLANTED_TRANSFORMS = ("resize", "jpeg", "crop", "jitter", "crop_centre", "crop_offcentre", "brightness",
                      "contrast", "pad", "hflip")


# ----------------------------------------------------------------------------- hashes

def phash_code(image: Image.Image) -> np.ndarray:
    """The 64-bit pHash of ``image`` as 8 packed bytes (uint8, shape (8,))."""
    import imagehash

    return np.packbits(imagehash.phash(image, hash_size=8).hash.reshape(-1))


def view_hash(image: Image.Image) -> np.ndarray:
    """pHash then dHash (64 bits each) of ``image`` as 16 packed bytes (uint8, shape (16,))."""
    import imagehash

    bits = np.concatenate([imagehash.phash(image, hash_size=8).hash.reshape(-1),
                           imagehash.dhash(image, hash_size=8).hash.reshape(-1)])
    return np.packbits(bits)


def border_box(gray: np.ndarray, tolerance: int = BORDER_TOLERANCE,
               max_fraction: float = BORDER_MAX_FRACTION) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the greyscale ``gray`` (H, W) without its uniform border.

    From each side, lines (rows or columns) are trimmed while every pixel of the line is within
    ``tolerance`` grey levels of the median of that side's outermost line, and at most
    ``int(max_fraction * side)`` lines (so a flat image keeps its centre). Padding or a frame added
    to a copy is removed this way, while an image without a border keeps all of its pixels.
    """
    g = np.asarray(gray, dtype=np.int16)
    h, w = g.shape

    def run(lines: np.ndarray, limit: int) -> int:
        """How many leading lines of ``lines`` (L, M), at most ``limit``, are uniform with the first."""
        ref = np.median(lines[0])
        bad = np.flatnonzero(np.abs(lines[:limit] - ref).max(axis=1) > tolerance)
        return int(bad[0]) if bad.size else limit

    lim_h, lim_w = int(h * max_fraction), int(w * max_fraction)
    top, bottom = run(g, lim_h), run(g[::-1], lim_h)
    left, right = run(g.T, lim_w), run(g.T[::-1], lim_w)
    return left, top, w - right, h - bottom


def window_boxes(width: int, height: int, scale: float = WINDOW_SCALE) -> list[tuple[int, int, int, int]]:
    """The :data:`WINDOWS` keeping ``scale`` of each side, as PIL boxes ``(left, top, right, bottom)``:
    centred (offsets rounded down), then at the four corners."""
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    dx, dy = width - w, height - h
    return [(x, y, x + w, y + h) for x, y in ((dx // 2, dy // 2), (0, 0), (dx, 0), (0, dy), (dx, dy))]


def shorter_side_to(image: Image.Image, side: int, resample: int) -> Image.Image:
    """``image`` resized (aspect kept, ``resample`` filter) so that its shorter side is ``side``."""
    w, h = image.size
    f = side / min(w, h)
    return image.resize((max(1, round(w * f)), max(1, round(h * f))), resample)


def work_image(image: Image.Image, side: int = WORK_SIDE, mode: str = "L",
               resample: int = Image.LANCZOS) -> Image.Image:
    """``image`` in ``mode`` (greyscale by default), scaled down (aspect kept, ``resample`` filter) so
    its shorter side is at most ``side``: every view is cut from this, so hashing costs the same for
    any input size."""
    img = image if image.mode == mode else image.convert(mode)   # never changed in place: no copy
    return shorter_side_to(img, side, resample) if min(img.size) > side else img


def upscaled(image: Image.Image, side: int = MIN_WORK_SIDE) -> Image.Image:
    """``image`` scaled up (bicubic, aspect kept) so its shorter side is at least ``side``; an image
    that large already is returned as it is."""
    return image if min(image.size) >= side else shorter_side_to(image, side, Image.BICUBIC)


def colour_grid(image: Image.Image, grid: int = COLOUR_GRID) -> np.ndarray:
    """Mean RGB of each cell of a ``grid`` x ``grid`` split of ``image`` (PIL's box filter: exact
    area means, rounded), cells row by row: uint8 ``(3 * grid * grid,)``."""
    return np.asarray(image.convert("RGB").resize((grid, grid), Image.BOX), dtype=np.uint8).reshape(-1)


def view_codes(image: Image.Image, min_side: int = MIN_WORK_SIDE) -> np.ndarray:
    """The code of every one of the :data:`VIEWS` of ``image``: uint8 ``(len(VIEWS), CODE_BYTES)``,
    per view its :func:`view_hash` (greyscale) then its :func:`colour_grid` (RGB, same box); the
    trimmed image is scaled up to ``min_side`` first (:func:`upscaled`; 0: never)."""
    # the colour grid needs area means only: the box filter gives them at a fraction of Lanczos's cost
    gray, rgb = work_image(image), work_image(image, mode="RGB", resample=Image.BOX)
    box = border_box(np.asarray(gray))
    if box != (0, 0) + gray.size:
        gray, rgb = gray.crop(box), rgb.crop(box)
    gray, rgb = upscaled(gray, min_side), upscaled(rgb, min_side)
    flip, boxes = Image.Transpose.FLIP_LEFT_RIGHT, window_boxes(*gray.size)
    hashes = [view_hash(v) for v in [gray, gray.transpose(flip)] + [gray.crop(b) for b in boxes]]
    colours = [colour_grid(v) for v in [rgb, rgb.transpose(flip)] + [rgb.crop(b) for b in boxes]]
    return np.concatenate([np.stack(hashes), np.stack(colours)], axis=1)


def codes_hex(image: Image.Image) -> str:
    """:func:`view_codes` of ``image`` as hex text (how shards and item-index parts store them)."""
    return view_codes(image).tobytes().hex()


def codes_from_hex(text: str) -> np.ndarray:
    """The view codes stored by :func:`codes_hex`: uint8 ``(len(VIEWS), CODE_BYTES)``."""
    return np.frombuffer(bytes.fromhex(text), np.uint8).reshape(len(VIEWS), CODE_BYTES)


def hash_settings() -> dict:
    """What the view codes and their matching depend on (shards and item indexes made under other
    settings are not reused)."""
    return {"hash": "phash+dhash", "views": list(VIEWS), "work_side": WORK_SIDE, "min_work_side": MIN_WORK_SIDE,
            "window_scale": WINDOW_SCALE, "border_tolerance": BORDER_TOLERANCE,
            "border_max_fraction": BORDER_MAX_FRACTION, "code_bytes": CODE_BYTES, "colour_grid": COLOUR_GRID,
            "chroma_offset": CHROMA_OFFSET, "colour_bound": COLOUR_BOUND, "hash_margin": HASH_MARGIN,
            "tight_colour_bound": TIGHT_COLOUR_BOUND, "luma_bound": LUMA_BOUND, "luma_eps": LUMA_EPS}


@dataclass(frozen=True)
class Rule:
    """How images are hashed (``hasher``: image -> (V, B) codes) and which views are compared."""

    hasher: Callable[[Image.Image], np.ndarray] = view_codes
    query: tuple[int, ...] = QUERY_VIEWS
    index: tuple[int, ...] = INDEX_VIEWS


def _plain_phash(image: Image.Image) -> np.ndarray:
    return phash_code(image)[None]


VIEW_RULE = Rule()
PLAIN_RULE = Rule(_plain_phash, (0,), (0,))   # one 64-bit pHash of the whole image (the audit before views)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance between packed codes along the last axis (broadcasts)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)


def chromaticity(grid: np.ndarray) -> np.ndarray:
    """Per cell of uint8 RGB means ``grid`` (..., 3 * cells): ``(c1, c2)`` with ``s = R+G+B+24``,
    ``c1 = (R-G)/s``, ``c2 = (R+G-2B)/s``; float ``(..., cells, 2)``."""
    g = np.asarray(grid, dtype=np.float64)
    rgb = g.reshape(g.shape[:-1] + (-1, 3))
    r, gr, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    s = r + gr + b + CHROMA_OFFSET
    return np.stack([(r - gr) / s, (r + gr - 2.0 * b) / s], axis=-1)


def colour_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Colour distance of two views' colour grids (..., 3 * cells): the largest over the cells of
    ``|dc1| + |dc2|`` (:func:`chromaticity`); broadcasts over ``...``."""
    return np.abs(chromaticity(a) - chromaticity(b)).sum(axis=-1).max(axis=-1)


def luma_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Light-pattern distance of two views' colour grids (..., 3 * cells): per cell the grey level
    ``L = (R+G+B)/3`` as ``z = (L - mean) / (std + LUMA_EPS)`` over the view's cells (a brightness
    or contrast change, affine in the grey level, leaves it almost unchanged), then the largest
    ``|dz|`` over the cells; broadcasts over ``...``."""
    def z(grid):
        g = np.asarray(grid, dtype=np.float64)
        lum = g.reshape(g.shape[:-1] + (-1, 3)).mean(axis=-1)
        return (lum - lum.mean(axis=-1, keepdims=True)) / (lum.std(axis=-1, keepdims=True) + LUMA_EPS)
    return np.abs(z(a) - z(b)).max(axis=-1)


def near_match(hash_dist, colour_dist, luma_dist, threshold: int = DEFAULT_THRESHOLD):
    """The rule for one (query view, index view) pair, elementwise: ``hash <= threshold`` and
    ``colour <=`` :data:`COLOUR_BOUND`, or ``hash <= threshold +`` :data:`HASH_MARGIN`, ``colour <=``
    :data:`TIGHT_COLOUR_BOUND` and ``luma <=`` :data:`LUMA_BOUND`."""
    h, c, lum = np.asarray(hash_dist), np.asarray(colour_dist), np.asarray(luma_dist)
    return (((h <= threshold) & (c <= COLOUR_BOUND))
            | ((h <= threshold + HASH_MARGIN) & (c <= TIGHT_COLOUR_BOUND) & (lum <= LUMA_BOUND)))


def colour_match(hash_dist, colour_a: np.ndarray, colour_b: np.ndarray, threshold: int = DEFAULT_THRESHOLD):
    """:func:`near_match` for view pairs given their hash distance and their colour grids (..., 3 * cells)."""
    return near_match(hash_dist, colour_distance(colour_a, colour_b), luma_distance(colour_a, colour_b), threshold)


def has_colour(codes: np.ndarray) -> bool:
    """Whether view codes (..., V, B) carry a colour grid after the hash (``B ==`` :data:`CODE_BYTES`)."""
    return np.ndim(codes) >= 2 and np.shape(codes)[-1] == CODE_BYTES


def search_radius(threshold: int, coloured: bool) -> int:
    """The largest hash distance the rule can accept: ``threshold + HASH_MARGIN`` with colour, else ``threshold``."""
    return int(threshold) + (HASH_MARGIN if coloured else 0)


def _both_ways(a: np.ndarray, b: np.ndarray, query: tuple[int, ...], index: tuple[int, ...]):
    """The two (query views of one, index views of the other) pairs of codes ``a``, ``b`` (..., V, B),
    shaped (..., Q, 1, B) and (..., 1, I, B) so that they broadcast to every view pair."""
    for x, y in ((a, b), (b, a)):
        yield x[..., list(query), None, :], y[..., None, list(index), :]


def view_distance(a: np.ndarray, b: np.ndarray, query: tuple[int, ...] = QUERY_VIEWS,
                  index: tuple[int, ...] = INDEX_VIEWS) -> np.ndarray:
    """The smallest *hash* distance of a query view of one of ``a``, ``b`` (..., V, B) to an index
    view of the other (broadcasts over ``...``); the colour part, if any, is left out."""
    a, b = np.asarray(a)[..., :HASH_BYTES], np.asarray(b)[..., :HASH_BYTES]
    return np.minimum(*(hamming(q, i).min(axis=(-2, -1)) for q, i in _both_ways(a, b, query, index)))


def view_match(a: np.ndarray, b: np.ndarray, threshold: int = DEFAULT_THRESHOLD,
               query: tuple[int, ...] = QUERY_VIEWS, index: tuple[int, ...] = INDEX_VIEWS) -> np.ndarray:
    """Whether view codes ``a`` and ``b`` (..., V, B) are near-duplicates under the rule
    (:func:`near_match` for some query view of one and index view of the other; hash alone for
    codes without colour); bool, broadcasts over ``...``."""
    a, b = np.asarray(a), np.asarray(b)
    if not has_colour(a):
        return view_distance(a, b, query, index) <= threshold
    hits = [colour_match(hamming(q[..., :HASH_BYTES], i[..., :HASH_BYTES]), q[..., HASH_BYTES:], i[..., HASH_BYTES:],
                         threshold).any(axis=(-2, -1)) for q, i in _both_ways(a, b, query, index)]
    return hits[0] | hits[1]


# ----------------------------------------------------------------------------- search

def _views(codes: np.ndarray, query, index) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """``codes`` as (N, V, B); a plain (N, B) array is one view, compared with itself."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.ndim == 2:
        return codes[:, None, :], (0,), (0,)
    return codes, tuple(QUERY_VIEWS if query is None else query), tuple(INDEX_VIEWS if index is None else index)


def _image_pairs(qimg: np.ndarray, jimg: np.ndarray) -> np.ndarray:
    """Distinct pairs (i, j), i < j, of two aligned arrays of image numbers; shape (P, 2), sorted."""
    a, b = np.minimum(qimg, jimg), np.maximum(qimg, jimg)
    keep = a != b
    if not keep.any():
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.stack([a[keep], b[keep]], axis=1).astype(np.int64), axis=0)


def accepted_candidates(codes: np.ndarray, query: tuple[int, ...], index: tuple[int, ...], q: np.ndarray,
                        x: np.ndarray, hash_dist: np.ndarray, threshold: int, block: int = 1 << 18) -> np.ndarray:
    """Which candidates the rule accepts: ``q`` numbers a query code in ``codes[:, query]`` flattened,
    ``x`` an index code in ``codes[:, index]`` flattened, ``hash_dist`` their hash distance (a
    search within :func:`search_radius` gives them); the colour and light distances are computed
    for ``block`` candidates at a time. Codes without colour: ``hash_dist <= threshold``."""
    if not has_colour(codes):
        return hash_dist <= threshold
    qv, xv = np.asarray(query, np.int64), np.asarray(index, np.int64)
    keep = np.zeros(len(q), dtype=bool)
    for lo in range(0, len(q), block):
        qs, xs = q[lo:lo + block], x[lo:lo + block]
        a = codes[qs // len(qv), qv[qs % len(qv)], HASH_BYTES:]
        b = codes[xs // len(xv), xv[xs % len(xv)], HASH_BYTES:]
        keep[lo:lo + block] = colour_match(hash_dist[lo:lo + block], a, b, threshold)
    return keep


def near_pairs(codes: np.ndarray, threshold: int, query: tuple[int, ...] | None = None,
               index: tuple[int, ...] | None = None) -> np.ndarray:
    """All pairs (i, j), i < j, of images that the rule matches at ``threshold``; shape (P, 2), sorted.

    ``codes``: (N, B) -- one hash per image -- or (N, V, B) view codes (:func:`view_codes`), the
    ``query`` views of each image searched against the ``index`` views of every image (default
    :data:`QUERY_VIEWS`, :data:`INDEX_VIEWS`). Exact: faiss's brute force over all pairs of hashes
    within :func:`search_radius`, then the rule on those candidates.
    """
    import faiss

    codes, query, index = _views(codes, query, index)
    n = len(codes)
    if threshold < 0 or n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    coloured = has_colour(codes)
    hashes = codes[..., :HASH_BYTES] if coloured else codes
    nbytes = hashes.shape[-1]
    flat = faiss.IndexBinaryFlat(nbytes * 8)
    flat.add(np.ascontiguousarray(hashes[:, list(index)].reshape(-1, nbytes)))
    queries = np.ascontiguousarray(hashes[:, list(query)].reshape(-1, nbytes))
    lims, dist, ids = flat.range_search(queries, search_radius(threshold, coloured) + 1)  # keeps d < radius
    q = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(lims).astype(np.int64))
    x = ids.astype(np.int64)
    keep = accepted_candidates(codes, query, index, q, x, dist.astype(np.int64), threshold)
    return _image_pairs(q[keep] // len(query), x[keep] // len(index))


def near_pairs_bruteforce(codes: np.ndarray, threshold: int, query: tuple[int, ...] | None = None,
                          index: tuple[int, ...] | None = None, block_words: int = 1 << 22) -> np.ndarray:
    """The same pairs as :func:`near_pairs` by numpy over all pairs of hashes (reference and
    benchmark), comparing blocks of queries with all index hashes, about ``block_words`` 64-bit
    words at a time, then the rule on the candidates."""
    codes, query, index = _views(codes, query, index)
    if threshold < 0:
        return np.zeros((0, 2), dtype=np.int64)
    coloured = has_colour(codes)
    hashes = np.ascontiguousarray(codes[..., :HASH_BYTES] if coloured else codes)
    nbytes = hashes.shape[-1]
    qh = np.ascontiguousarray(hashes[:, list(query)].reshape(-1, nbytes)).view(np.uint64)   # hashes as 64-bit words
    xh = np.ascontiguousarray(hashes[:, list(index)].reshape(-1, nbytes)).view(np.uint64)
    radius = search_radius(threshold, coloured)
    out = [np.zeros((0, 2), dtype=np.int64)]
    block = max(1, block_words // max(1, xh.size))
    for lo in range(0, len(qh), block):
        d = np.bitwise_count(np.bitwise_xor(qh[lo:lo + block, None, :], xh[None, :, :])).sum(axis=-1, dtype=np.int64)
        i, j = np.nonzero(d <= radius)
        keep = accepted_candidates(codes, query, index, i + lo, j, d[i, j], threshold)
        out.append(_image_pairs((i[keep] + lo) // len(query), j[keep] // len(index)))
    return np.unique(np.concatenate(out), axis=0)


# ----------------------------------------------------------------------------- planted copies

def _reencode(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return load_rgb(buf.getvalue())


def _factor(rng: np.random.Generator) -> float:
    """A colour factor 10-20% away from 1, either way."""
    return 1.0 + float(rng.choice([-1.0, 1.0])) * rng.uniform(0.1, 0.2)


def _crop_back(img: Image.Image, rng: np.random.Generator, centred: bool) -> Image.Image:
    """A crop keeping 85-95% of each side, resized back to the image's size; off-centre crops sit
    in a corner half the time and anywhere inside the image otherwise."""
    w, h = img.size
    f = rng.uniform(0.85, 0.95)
    cw, ch = round(w * f), round(h * f)
    if centred:
        u = np.array([0.5, 0.5])
    else:
        u = rng.choice([0.0, 1.0], size=2) if rng.random() < 0.5 else rng.uniform(0.0, 1.0, size=2)
    left, top = round((w - cw) * u[0]), round((h - ch) * u[1])
    return img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)


def _pad(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A flat border (black, grey or white) adding 5-10% of the side: on one axis, split between its
    two sides, or on all four sides."""
    w, h = img.size
    total = round(max(w, h) * rng.uniform(0.05, 0.10))
    a = int(rng.integers(0, total + 1))
    fill = (int(rng.choice([0, 128, 255])),) * 3
    r = rng.random()
    border = (a, 0, total - a, 0) if r < 0.4 else (0, a, 0, total - a) if r < 0.8 else (total // 2,) * 4
    return ImageOps.expand(img, border, fill=fill)


def planted_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """One modified copy of ``image``, ``kind`` one of :data:`PLANTED_TRANSFORMS`:

    resize (0.5-0.8x), jpeg (quality 40-90), crop (2-5% off each side), jitter
    (brightness/contrast/saturation x0.8-1.2), crop_centre / crop_offcentre (85-95% of the side,
    resized back), brightness / contrast (x0.8-0.9 or x1.1-1.2), pad (a flat border adding 5-10%
    of the side), hflip (mirror).
    """
    img = load_rgb(image)
    w, h = img.size
    if kind == "resize":
        s = rng.uniform(0.5, 0.8)
        return img.resize((max(8, round(w * s)), max(8, round(h * s))), Image.BICUBIC)
    if kind == "jpeg":
        return _reencode(img, int(rng.integers(40, 91)))
    if kind == "crop":
        f = rng.uniform(0.02, 0.05, size=4)
        box = (round(w * f[0]), round(h * f[1]), w - round(w * f[2]), h - round(h * f[3]))
        return img.crop(box)
    if kind == "jitter":
        for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enh(img).enhance(rng.uniform(0.8, 1.2))
        return img
    if kind in ("crop_centre", "crop_offcentre"):
        return _crop_back(img, rng, centred=kind == "crop_centre")
    if kind == "brightness":
        return ImageEnhance.Brightness(img).enhance(_factor(rng))
    if kind == "contrast":
        return ImageEnhance.Contrast(img).enhance(_factor(rng))
    if kind == "pad":
        return _pad(img, rng)
    if kind == "hflip":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    raise ValueError(f"unknown planted copy {kind!r}; choose one of {PLANTED_TRANSFORMS}")


def planted_kinds(n_images: int, transforms: tuple[str, ...], per_image: int | None) -> list[tuple[str, ...]]:
    """The transforms planted on each of ``n_images`` images: all of them, or ``per_image`` of them
    taken in turn (image k gets transforms ``k*per_image .. k*per_image + per_image - 1``, modulo
    their number), so every transform is planted about equally often at a fixed cost per image."""
    if per_image is None or per_image >= len(transforms):
        return [tuple(transforms)] * n_images
    t = len(transforms)
    return [tuple(transforms[(k * per_image + j) % t] for j in range(per_image)) for k in range(n_images)]


@dataclass
class Calibration:
    """Recall/precision of the near-duplicate rule at ``threshold`` on planted copies."""

    threshold: int
    images: int                     # originals
    copies: int                     # planted copies
    recall: float                   # copies matched to their original (view_match)
    recall_by_transform: dict[str, float]
    precision: float                # pairs matched (near_pairs) that share an original
    pairs_found: int
    copy_distance_p95: float        # 95th percentile of copy-to-original hash distances (bits)
    other_distance_p01: float       # 1st percentile of hash distances between different originals

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def calibrate(images: list[Image.Image], threshold: int = DEFAULT_THRESHOLD, seed: int = 0,
              transforms: tuple[str, ...] = PLANTED_TRANSFORMS, per_image: int | None = None,
              rule: Rule = VIEW_RULE) -> Calibration:
    """Plant copies of each image (every transform, or ``per_image`` of them in turn:
    :func:`planted_kinds`) and measure ``rule`` at ``threshold``.

    Precision counts every pair of the originals-plus-copies set the rule matches
    (via :func:`near_pairs`); a pair is correct when both come from the same original.
    """
    if len(images) < 2:
        raise ValueError("calibration needs at least 2 distinct images")
    rng = np.random.default_rng(seed)
    codes, owner, kind = [], [], []
    for k, (img, kinds) in enumerate(zip(images, planted_kinds(len(images), transforms, per_image))):
        codes.append(rule.hasher(img))
        owner.append(k)
        kind.append("original")
        for t in kinds:
            codes.append(rule.hasher(planted_copy(img, t, rng)))
            owner.append(k)
            kind.append(t)
    codes_a, owner_a, kind_a = np.stack(codes), np.array(owner), np.array(kind)
    orig = np.flatnonzero(kind_a == "original")
    copies = np.flatnonzero(kind_a != "original")
    d_copy = view_distance(codes_a[copies], codes_a[orig[owner_a[copies]]], rule.query, rule.index)
    hit = view_match(codes_a[copies], codes_a[orig[owner_a[copies]]], threshold, rule.query, rule.index)
    pairs = near_pairs(codes_a, threshold, rule.query, rule.index)
    correct = int(np.sum(owner_a[pairs[:, 0]] == owner_a[pairs[:, 1]])) if len(pairs) else 0
    iu = np.triu_indices(len(orig), 1)
    d_other = view_distance(codes_a[orig][iu[0]], codes_a[orig][iu[1]], rule.query, rule.index)
    planted = [t for t in transforms if np.any(kind_a[copies] == t)]
    return Calibration(
        threshold=int(threshold), images=len(images), copies=len(copies), recall=float(hit.mean()),
        recall_by_transform={t: float(hit[kind_a[copies] == t].mean()) for t in planted},
        precision=float(correct / len(pairs)) if len(pairs) else 1.0, pairs_found=int(len(pairs)),
        copy_distance_p95=float(np.percentile(d_copy, 95)),
        other_distance_p01=float(np.percentile(d_other, 1)) if d_other.size else float("nan"))
