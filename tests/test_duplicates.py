"""Content-hash duplicate finding (memreg/duplicates.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from memreg.duplicates import ImageLoadError, content_hash, find_duplicates, first_caption


def _img(seed: int, size=(12, 10), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=None)


def test_planted_duplicates_found_exactly(tmp_path):
    a, b, c = _img(0), _img(1), _img(2)
    a.save(tmp_path / "a.png")
    a.save(tmp_path / "copy_of_a_renamed.png", compress_level=1)   # same pixels, other name and encoding
    near = np.asarray(a).copy()
    near[0, 0, 0] ^= 1                                               # one bit off: not a duplicate
    g = _img(3, mode="L")
    g.save(tmp_path / "gray1.png")
    g.save(tmp_path / "gray2.png")
    records = [
        {"image": str(tmp_path / "a.png"), "caption": "a", "id": 10},
        {"image": b, "caption": "b", "id": 11},
        {"image": str(tmp_path / "copy_of_a_renamed.png"), "caption": "a again", "id": 12},
        {"image": Image.fromarray(near), "caption": "near a", "id": 13},
        {"image": a.copy(), "caption": "a in memory", "id": 14},
        {"image": str(tmp_path / "gray1.png"), "caption": "g", "id": 15},
        {"image": c, "caption": "c", "id": 16},
        {"image": tmp_path / "gray2.png", "caption": "g2", "id": 17},
    ]
    idx = find_duplicates(records)
    assert idx.groups(2) == [[0, 2, 4], [5, 7]]
    assert idx.groups(3) == [[0, 2, 4]]
    assert idx.duplicated(2) == [0, 2, 4, 5, 7]
    assert idx.unique() == [1, 3, 6]
    assert [idx.count(i) for i in range(8)] == [3, 1, 3, 1, 3, 2, 1, 2]
    assert idx.first_of_each() == [0, 1, 3, 5, 6]


def test_hash_is_sha256_of_rgb_shape_and_bytes():
    im = _img(4)
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    expected = hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()
    assert content_hash(im) == expected
    # the same bytes in another shape are a different image
    flat = np.arange(48, dtype=np.uint8)
    assert content_hash(flat.reshape(4, 4, 3)) != content_hash(flat.reshape(2, 8, 3))


def test_unreadable_image_names_record_and_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match=r"record 7: .*broken\.png"):
        find_duplicates([{"image": str(bad), "caption": "x", "id": 7}])
    with pytest.raises(ImageLoadError, match="does not exist"):
        content_hash(str(tmp_path / "missing.png"))


def test_first_caption():
    assert first_caption(["first", "second"]) == "first"
    assert first_caption("  plain ") == "plain"
    assert first_caption([]) == ""
    assert first_caption(None) == ""


def test_audit_clusters_regroup_near_duplicates(tmp_path):
    """With an audit's clusters.jsonl, images in one cluster count as one (near-duplicates too)."""
    import json

    from memreg.monitor_config import EvalConfig

    a, a_jpeg, b, c = _img(1), _img(2), _img(3), _img(4)  # a_jpeg: another image standing in for a's copy
    clusters = tmp_path / "clusters.jsonl"
    clusters.write_text(json.dumps({"cluster": 0, "members": [{"row": 0, "sha256": content_hash(a)},
                                                              {"row": 1, "sha256": content_hash(a_jpeg)}]}) + "\n")
    records = [{"image": im} for im in (a, a_jpeg, b, a, c)]
    assert find_duplicates(records).counts[content_hash(a)] == 2
    idx = find_duplicates(records, clusters_from=clusters)
    assert [idx.count(i) for i in range(5)] == [3, 3, 1, 3, 1]
    assert idx.hashes[0] == idx.hashes[1] == "cluster:0" and idx.hashes[2] == content_hash(b)
    assert EvalConfig(duplicates_from=str(clusters)).duplicates_from == str(clusters)
    with pytest.raises(ValueError, match="eval.duplicates_from"):
        EvalConfig(duplicates_from=str(tmp_path / "missing.jsonl"))
    clusters.write_text('{"rows": [1]}\n')
    with pytest.raises(ValueError, match="line 1 is not a memreg audit cluster"):
        find_duplicates(records, clusters_from=clusters)
