"""memreg.demo.data's web world: wordings by hand, near-duplicate copies, unseen wordings never trained on."""

import json
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from memreg.demo import run
from memreg.demo.data import (DemoDataConfig, WebConfig, build_demo_dataset, load_photo, photo_variant,
                              split_wordings, wordings_of)

WEB = WebConfig(train_wordings=3, unseen_wordings=2, list_share=0.3, near_dup_share=0.5, near_dup_variants=3)
CFG = DemoDataConfig(seed=3, n_dup=3, dup_copies=12, n_unique=20, n_heldout=6, resolution=16, web=WEB)
NAMED = {"color": "green", "shape": "circle", "pair": {"color": "black", "shape": "triangle"}}


def _rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    out = tmp_path_factory.mktemp("web") / "data"
    build_demo_dataset(out, CFG)
    return out


def test_wordings_by_hand():
    # one word with a synonym (circle -> disc): 2 orders x 3 colour choices x 2 = 12, canonical first
    assert wordings_of(NAMED) == [
        "a green circle and a black triangle", "a green disc and a black triangle",
        "a circle and a black triangle", "a disc and a black triangle",
        "a green circle and a triangle", "a green disc and a triangle",
        "a black triangle and a green circle", "a black triangle and a green disc",
        "a triangle and a green circle", "a triangle and a green disc",
        "a black triangle and a circle", "a black triangle and a disc"]
    # red (crimson) and square (box), per order: both colours 4, red left out 2 (only square/box differs),
    # white left out 4; 2 orders x 10 = 20, none repeated
    two = {"color": "red", "shape": "square", "pair": {"color": "white", "shape": "cross"}}
    assert len(wordings_of(two)) == len(set(wordings_of(two))) == 20


def test_split_keeps_the_canonical_caption_and_never_overlaps():
    train, unseen = split_wordings(NAMED, WEB, np.random.default_rng(0))
    assert train[0] == "a green circle and a black triangle" and len(train) == 3 and len(unseen) == 2
    assert not set(train) & set(unseen) and set(train + unseen) <= set(wordings_of(NAMED))
    # training wordings name both colours: of NAMED's 12, the 4 with "green" and "black"
    both = {w for w in wordings_of(NAMED) if "green" in w and "black" in w}
    assert len(both) == 4 and set(train) <= both
    train4, _ = split_wordings(NAMED, WebConfig(train_wordings=4, unseen_wordings=3), np.random.default_rng(0))
    assert set(train4) == both
    with pytest.raises(ValueError, match="has 4 naming both colours and 12 in all"):
        split_wordings(NAMED, WebConfig(train_wordings=5, unseen_wordings=3), np.random.default_rng(0))
    with pytest.raises(ValueError, match="has 4 naming both colours and 12 in all"):
        split_wordings(NAMED, WebConfig(train_wordings=4, unseen_wordings=9), np.random.default_rng(0))


def test_rows_carry_training_wordings_only(web):
    manifest = json.loads((web / "manifest.json").read_text())
    train = _rows(web / "train")
    assert len(train) == 3 * 12 + 20
    assert all(isinstance(r["captions"], list) and r["captions"] and r["caption"] == r["captions"][0] for r in train)
    for m in manifest["memorized"]:
        rows = [r for r in train if r.get("source") == m["source"]]
        used = {w for r in rows for w in r["captions"]}
        assert used <= set(m["train_wordings"]) and m["caption"] == m["train_wordings"][0]
        assert not used & set(m["paraphrases"].values())                  # unseen wordings: in no training row
        assert set(m["paraphrases"]) == {"unseen_0", "unseen_1"}
        lists = [r for r in rows if len(r["captions"]) > 1]
        assert all(r["captions"] == m["train_wordings"] for r in lists)
    assert all(r["captions"] == [r["caption"]] for r in _rows(web / "heldout"))


def test_copies_are_the_photo_or_its_near_duplicates(web):
    train = _rows(web / "train")
    for src in {r["source"] for r in train if r["group"] == "duplicated"}:
        rows = [r for r in train if r.get("source") == src]
        photo = np.asarray(load_photo(src, 16))
        pixels = {r["variant"]: np.asarray(Image.open(web / "train" / r["file_name"]).convert("RGB")) for r in rows}
        assert "original" in pixels and np.array_equal(pixels["original"], photo)
        others = [v for v in pixels if v != "original"]
        assert others and all(not np.array_equal(pixels[v], photo) for v in others)
        # near, not new: every variant stays close to the photo (mean absolute difference in grey levels)
        assert all(np.abs(pixels[v].astype(float) - photo).mean() < 40 for v in others)


def test_scenes_are_the_first_worlds(web, tmp_path):
    build_demo_dataset(tmp_path / "studio", DemoDataConfig(**{**asdict(CFG), "web": None}))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "captions"} for r in rows if r["group"] != "duplicated"]  # noqa: E731
    assert strip(_rows(web / "train")) == strip(_rows(tmp_path / "studio" / "train"))
    assert strip(_rows(web / "heldout")) == strip(_rows(tmp_path / "studio" / "heldout"))
    assert CFG.base_world() == DemoDataConfig(**{**asdict(CFG), "web": None})


def test_variant_kinds_and_bad_knobs():
    rng = np.random.default_rng(0)
    for kind in ("jpeg", "crop", "brightness"):
        assert photo_variant("coffee", 16, kind, rng).size == (16, 16)
    with pytest.raises(ValueError, match="unknown near-duplicate kind"):
        photo_variant("coffee", 16, "rotate", rng)
    with pytest.raises(ValueError, match="list_share"):
        WebConfig(list_share=1.5)
    with pytest.raises(ValueError, match="wordings"):
        WebConfig(train_wordings=0)


def test_the_cache_keys_name_the_generators_of_their_world(monkeypatch):
    studio = CFG.base_world()
    assert run._data_fields(studio) == {**{k: v for k, v in asdict(studio).items() if k != "web"},
                                        "heldout_generator": run.HELDOUT_GENERATOR}
    before, before_studio = run._key(run._data_fields(CFG)), run._key(run._data_fields(studio))
    monkeypatch.setattr(run, "WEB_GENERATOR", run.WEB_GENERATOR + 1)
    assert run._key(run._data_fields(CFG)) != before             # a new generator rebuilds the web world
    assert run._key(run._data_fields(studio)) == before_studio   # ... and only it
    monkeypatch.setattr(run, "HELDOUT_GENERATOR", run.HELDOUT_GENERATOR + 1)
    assert run._key(run._data_fields(studio)) != before_studio   # a new held-out rule rebuilds both
