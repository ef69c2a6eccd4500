"""memreg.demo.data.py: counts, exact duplicates, captions that underdetermine images, determinism."""

import hashlib
import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from memreg.demo.data import (SYNONYMS, DemoDataConfig, WorldConfig, build_demo_dataset, caption_of, paraphrases,
                              photo_shapes_of, pretrain_rows, random_scene, shapes_named)

CFG = DemoDataConfig(seed=3, n_dup=3, dup_copies=5, n_unique=60, n_heldout=12, resolution=16)


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
    assert len(train) == 3 * 5 + 60
    dup = [r for r in train if r["group"] == "duplicated"]
    hashes = Counter(_pixel_hash(demo / "train" / r["file_name"]) for r in train)
    # Every photo occurs exactly D times, every procedural scene exactly once.
    assert sorted(hashes.values(), reverse=True) == [5, 5, 5] + [1] * 60
    assert len({r["caption"] for r in dup}) == 3
    assert Image.open(demo / "train" / train[0]["file_name"]).size == (16, 16)


def test_ordinary_captions_cover_several_different_images(demo):
    by_caption = defaultdict(set)
    for r in _rows(demo / "train"):
        by_caption[r["caption"]].add(_pixel_hash(demo / "train" / r["file_name"]))
    scene_caps = {r["caption"] for r in _rows(demo / "train") if r["group"] == "unique"}
    # With 60 scenes, the plain "a <colour> <shape>" captions (40% of them, 32 possible) repeat.
    assert max(len(by_caption[c]) for c in scene_caps) >= 2


def test_memorized_captions_use_only_words_of_the_pretraining_captions(demo):
    manifest = json.loads((demo / "manifest.json").read_text())
    pre_words = {w for _, m in pretrain_rows(3000, CFG) for w in m["caption"].replace(",", "").split()}
    for m in manifest["memorized"]:
        assert set(m["caption"].split()) <= pre_words
        for text in m["paraphrases"].values():
            assert set(text.split()) <= pre_words


def test_no_scene_uses_a_memorized_shape_pair(demo):
    manifest = json.loads((demo / "manifest.json").read_text())
    pairs = {frozenset([(m["named"]["color"], m["named"]["shape"]),
                        (m["named"]["pair"]["color"], m["named"]["pair"]["shape"])]) for m in manifest["memorized"]}
    scenes = [r for r in _rows(demo / "train") + _rows(demo / "heldout") if r["group"] != "duplicated"]
    scenes += [m for _, m in pretrain_rows(500, CFG)]
    for r in scenes:
        n = r["named"]
        if "pair" in n:
            assert frozenset([(n["color"], n["shape"]), (n["pair"]["color"], n["pair"]["shape"])]) not in pairs


def test_caption_and_paraphrases_by_hand():
    named = {"color": "red", "shape": "square", "pair": {"color": "white", "shape": "cross"}}
    assert caption_of(named) == "a red square and a white cross"
    assert caption_of({"color": "blue", "shape": "circle", "background": "red", "position": "center"},
                      {"circle": "disc", "red": "crimson"}) == "a blue disc on a crimson background, center"
    assert paraphrases(named) == {"drop": "a red square and a cross", "reorder": "a white cross and a red square",
                                  "synonym": "a crimson square and a white cross"}
    assert SYNONYMS["red"] == "crimson"


def test_heldout_images_are_new_and_captions_are_scene_captions(demo):
    train = _rows(demo / "train")
    held = _rows(demo / "heldout")
    assert len(held) == 12
    train_hashes = {_pixel_hash(demo / "train" / r["file_name"]) for r in train}
    assert not train_hashes & {_pixel_hash(demo / "heldout" / r["file_name"]) for r in held}
    dup_caps = {r["caption"] for r in train if r["group"] == "duplicated"}
    assert not dup_caps & {r["caption"] for r in held}


def test_heldout_captions_name_no_coloured_shape_of_a_photo(demo):
    manifest = json.loads((demo / "manifest.json").read_text())
    photo_shapes = photo_shapes_of([m["named"] for m in manifest["memorized"]])
    assert len(photo_shapes) >= 4      # 3 photos, two coloured shapes each (they may share one)
    held = _rows(demo / "heldout")
    assert all(not shapes_named(r["named"]) & photo_shapes for r in held)
    # the rule is held-out's only: training scenes still name the photos' coloured shapes
    train = [r for r in _rows(demo / "train") if r["group"] == "unique"]
    assert any(shapes_named(r["named"]) & photo_shapes for r in train)


def test_shapes_named_and_photo_shapes_by_hand():
    a = {"color": "red", "shape": "square", "pair": {"color": "white", "shape": "cross"}}
    b = {"color": "red", "shape": "square", "pair": {"color": "blue", "shape": "circle"}}
    assert shapes_named({"color": "red", "shape": "square"}) == {("red", "square")}
    assert photo_shapes_of([a, b]) == {("red", "square"), ("white", "cross"), ("blue", "circle")}
    assert photo_shapes_of([]) == set()


def test_a_scene_without_forbidden_shapes_keeps_its_draws():
    """The held-out rule draws differently only where it applies: training scenes keep their bits."""
    world = WorldConfig(p_pair=0.5)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    plain = [random_scene(rng_a, world) for _ in range(20)]
    again = [random_scene(rng_b, world, forbidden_shapes=set()) for _ in range(20)]
    assert [(x, x.named) for x in plain] == [(x, x.named) for x in again]
    every = {(c, s) for c in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
             for s in ("circle", "square", "triangle")}
    rng = np.random.default_rng(0)
    for _ in range(50):       # only crosses are left, so no scene can name a second shape
        n = random_scene(rng, world, forbidden_shapes=every).named
        assert n["shape"] == "cross" and "pair" not in n


def test_naming_probabilities_are_respected():
    world = WorldConfig(p_background=0.0, p_position=0.0, p_pair=0.0, p_synonym=0.0)
    rows = pretrain_rows(50, DemoDataConfig(world=world))
    assert all(set(m["named"]) == {"color", "shape"} for _, m in rows)
    assert all(m["caption"] == f"a {m['named']['color']} {m['named']['shape']}" for _, m in rows)


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
