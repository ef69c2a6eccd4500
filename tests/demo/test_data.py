"""memreg.demo.data.py: counts, exact duplicates, held-out disjointness, determinism."""

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from memreg.demo.data import DemoDataConfig, build_demo_dataset

CFG = DemoDataConfig(seed=3, n_dup=3, dup_copies=5, n_unique=40, n_heldout=12, resolution=16)


def _rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _pixel_hash(path):
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    build_demo_dataset(out, CFG)
    return out


def test_counts_and_exact_duplicates(demo):
    train = _rows(demo / "train")
    assert len(train) == 3 * 5 + 40
    dup = [r for r in train if r["group"] == "duplicated"]
    hashes = Counter(_pixel_hash(demo / "train" / r["file_name"]) for r in train)
    # Every photo occurs exactly D times, every procedural scene exactly once.
    assert sorted(hashes.values(), reverse=True) == [5, 5, 5] + [1] * 40
    assert len({r["caption"] for r in dup}) == 3
    for r in dup:
        assert hashes[_pixel_hash(demo / "train" / r["file_name"])] == 5
    assert Image.open(demo / "train" / train[0]["file_name"]).size == (16, 16)


def test_heldout_compositions_are_never_trained_on(demo):
    train_caps = {r["caption"] for r in _rows(demo / "train")}
    held = _rows(demo / "heldout")
    assert len(held) == 12
    assert not train_caps & {r["caption"] for r in held}


def test_deterministic_per_seed(demo, tmp_path):
    build_demo_dataset(tmp_path / "again", CFG)
    assert _rows(tmp_path / "again" / "train") == _rows(demo / "train")
    a = [_pixel_hash(demo / "train" / r["file_name"]) for r in _rows(demo / "train")]
    b = [_pixel_hash(tmp_path / "again" / "train" / r["file_name"]) for r in _rows(tmp_path / "again" / "train")]
    assert a == b
    build_demo_dataset(tmp_path / "other", DemoDataConfig(**{**CFG.__dict__, "seed": 4}))
    assert _rows(tmp_path / "other" / "train") != _rows(demo / "train")


def test_refuses_non_empty_dir_and_bad_knobs(demo, tmp_path):
    with pytest.raises(FileExistsError, match="not empty"):
        build_demo_dataset(demo, CFG)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_demo_dataset(tmp_path / "x", DemoDataConfig(resolution=20))
    with pytest.raises(ValueError, match="n_dup"):
        build_demo_dataset(tmp_path / "y", DemoDataConfig(n_dup=99))
