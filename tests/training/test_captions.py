"""Caption augmentation and repeats (kohya semantics): the pure rules, the dataset/sampler wiring, the trainer.

Expected captions are worked out by hand from scripted uniform draws (``Draws``) or from the numbers
numpy's seeded generators produce (written out below), not from the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from memreg import image_ops
from memreg.image_io import load_rgb
from memreg.training import captions as C
from memreg.training import data as D
from memreg.training.config import ConfigError, load_config
from .conftest import TINY_CONFIG, make_imagefolder, run


class Draws:
    """A generator stand-in handing out scripted uniform draws; ``taken`` counts them."""

    def __init__(self, values):
        self.values = list(values)
        self.taken = 0

    def random(self, size=None):
        n = 1 if size is None else size
        if n > len(self.values):
            raise AssertionError(f"asked for {n} draws, {len(self.values)} left")
        out, self.values = self.values[:n], self.values[n:]
        self.taken += n
        return out[0] if size is None else np.array(out)


def _aug(caption, draws, **kw):
    rng = Draws(draws)
    return C.augment_caption(caption, C.CaptionConfig(**kw), rng), rng


# --------------------------------------------------------------------------- the caption rule

def test_shuffle_keeps_the_first_keep_tokens_and_orders_the_rest_by_their_draws():
    # keys b .9, c .1, d .5 -> ascending c, d, b; "a" stays in front
    out, rng = _aug("a, b, c, d", [0.9, 0.1, 0.5], shuffle_caption=True, keep_tokens=1)
    assert out == "a, c, d, b" and rng.taken == 3
    # keys a .9, b .1, c .5, d .3 -> b, d, c, a
    out, rng = _aug("a, b, c, d", [0.9, 0.1, 0.5, 0.3], shuffle_caption=True, keep_tokens=0)
    assert out == "b, d, c, a" and rng.taken == 4
    # keep_tokens at or above the tag count: nothing to shuffle, no draws, tags re-joined with ", "
    out, rng = _aug("a,b", [], shuffle_caption=True, keep_tokens=2)
    assert out == "a, b" and rng.taken == 0


def test_tag_dropout_follows_the_shuffle_and_spares_the_kept_tags():
    # shuffle keys b .9, c .1, d .5 -> c, d, b; then dropout draws c .2 (< .3: dropped), d .3 (kept: >=), b .95
    out, rng = _aug("a, b, c, d", [0.9, 0.1, 0.5, 0.2, 0.3, 0.95], shuffle_caption=True, keep_tokens=1,
                    caption_tag_dropout_rate=0.3)
    assert out == "a, d, b" and rng.taken == 6
    # no shuffle: order kept, one draw per non-kept tag (b .1 dropped, c .7 kept, d .29 dropped)
    out, rng = _aug("a, b, c, d", [0.1, 0.7, 0.29], keep_tokens=1, caption_tag_dropout_rate=0.3)
    assert out == "a, c" and rng.taken == 3
    # rate 1 drops every non-kept tag whatever the draw (draws are < 1)
    out, _ = _aug("a, b, c, d", [0.999, 0.999], keep_tokens=2, caption_tag_dropout_rate=1.0)
    assert out == "a, b"


def test_caption_dropout_comes_first_and_blanks_the_whole_caption():
    out, rng = _aug("a, b, c", [0.4, 0.0, 0.0], shuffle_caption=True, caption_dropout_rate=0.5)
    assert out == "" and rng.taken == 1  # dropped: no shuffle draws
    # 0.5 is not < 0.5: kept; keys a .3, b .2, c .1 -> c, b, a
    out, rng = _aug("a, b, c", [0.5, 0.3, 0.2, 0.1], shuffle_caption=True, caption_dropout_rate=0.5)
    assert out == "c, b, a" and rng.taken == 4
    out, _ = _aug("a, b, c", [0.999], caption_dropout_rate=1.0)
    assert out == ""
    # dropout alone never re-joins a kept caption
    out, rng = _aug(" a ,b", [0.7], caption_dropout_rate=0.5)
    assert out == " a ,b" and rng.taken == 1


def test_rates_zero_draw_nothing_and_leave_the_caption_untouched():
    for caption in ("a, b, c", " a ,b,,", "one sentence. no tags", ""):
        out, rng = _aug(caption, [], shuffle_caption=False, keep_tokens=3, caption_dropout_rate=0.0,
                        caption_tag_dropout_rate=0.0)
        assert out == caption and rng.taken == 0
    assert not C.CaptionConfig(keep_tokens=3, num_repeats=4).changes_captions


def test_separator_strip_and_empty_tags():
    # tags split on ";" and stripped; joined with ", " as kohya does; keys x .5, y .2, z .8 -> y, x, z
    out, _ = _aug("x; y ;z", [0.5, 0.2, 0.8], shuffle_caption=True, caption_separator=";")
    assert out == "y, x, z"
    # empty tags (doubled or trailing separator) are dropped before keep_tokens counts
    out, rng = _aug(",a,, b ,", [0.0], keep_tokens=1, caption_tag_dropout_rate=0.5)
    assert out == "a" and rng.taken == 1  # b drawn 0.0 < 0.5: dropped
    out, _ = _aug("", [], shuffle_caption=True)
    assert out == ""


def test_a_seeded_generator_gives_the_hand_derived_caption():
    # np.random.default_rng(7).random(7) = .6251, .8972, .7757, .2252, .3002, .8736, .0053 (numpy's own numbers)
    rng = np.random.default_rng(7)
    cfg = C.CaptionConfig(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.5, caption_tag_dropout_rate=0.25)
    # .6251 >= .5: not dropped; keys b .8972, c .7757, d .2252 -> d, c, b; tag draws d .3002 keep,
    # c .8736 keep, b .0053 < .25 drop
    assert C.augment_caption("a, b, c, d", cfg, rng) == "a, d, c"
    assert rng.random() == np.random.default_rng(7).random(8)[7]  # exactly 7 draws taken


def test_caption_rng_is_a_sub_stream_of_the_sample_key():
    key = [0, 3, 5]
    first = C.caption_rng(key).random(2)
    # the SeedSequence child of the key with the caption spawn key (numpy's numbers, written out)
    assert first.tolist() == pytest.approx([0.559114208095213, 0.8162584132649198])
    assert C.caption_rng(key).random(2).tolist() == first.tolist()
    # the main stream of the same key is another sequence
    assert D._sample_rng(0, 3, 5).random(2).tolist() == pytest.approx([0.35853886774669175, 0.21062853176549745])


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw, key", [
    (dict(caption_dropout_rate=1.5), "caption_dropout_rate"), (dict(caption_dropout_rate=-0.1), "caption_dropout_rate"),
    (dict(caption_dropout_rate=math.nan), "caption_dropout_rate"),
    (dict(caption_tag_dropout_rate=math.inf), "caption_tag_dropout_rate"),
    (dict(caption_tag_dropout_rate=True), "caption_tag_dropout_rate"),
    (dict(keep_tokens=-1), "keep_tokens"), (dict(keep_tokens=1.0), "keep_tokens"),
    (dict(keep_tokens=True), "keep_tokens"),
    (dict(num_repeats=0), "num_repeats"), (dict(num_repeats=2.5), "num_repeats"),
    (dict(caption_separator=""), "caption_separator"), (dict(shuffle_caption=1), "shuffle_caption"),
])
def test_bad_values_are_named_errors(kw, key):
    with pytest.raises(ValueError, match=rf"^{key}="):
        C.CaptionConfig(**kw)


def _cfg(data_dir, *flags, **kw):
    argv = ["--config", str(TINY_CONFIG), "--train_data_dir", str(data_dir), *flags]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return load_config(argv)


def test_train_config_keys_from_cli_and_yaml(tmp_path):
    cfg = _cfg(tmp_path, "--shuffle_caption", keep_tokens=2, caption_separator=";", caption_dropout_rate=0.1,
               caption_tag_dropout_rate=0.2, num_repeats=3)
    assert C.from_train_config(cfg) == C.CaptionConfig(True, 2, ";", 0.1, 0.2, 3, False)
    y = tmp_path / "c.yaml"
    y.write_text(TINY_CONFIG.read_text() + "shuffle_caption: true\nkeep_tokens: 1\nrepeats_from_folders: true\n")
    cfg = load_config(["--config", str(y)])
    assert C.from_train_config(cfg) == C.CaptionConfig(shuffle_caption=True, keep_tokens=1, repeats_from_folders=True)
    assert C.from_train_config(load_config(["--config", str(TINY_CONFIG)])) == C.CaptionConfig()
    with pytest.raises(ConfigError, match=r"caption_tag_dropout_rate=2.0 must be a number in \[0, 1\]"):
        _cfg(tmp_path, caption_tag_dropout_rate=2)
    with pytest.raises(ConfigError, match=r"num_repeats=0 must be an integer >= 1"):
        _cfg(tmp_path, num_repeats=0)
    with pytest.raises(ConfigError, match="keep_tokens"):
        _cfg(tmp_path, keep_tokens=1.5)


# --------------------------------------------------------------------------- repeats

def test_expand_repeats_counts():
    assert C.expand_repeats([0, 2, 3], [1, 5, 2, 3]) == [(0, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    assert C.expand_repeats([4, 1], None) == [(4, 0), (1, 0)]


def test_folder_repeats_follow_the_n_name_prefix(tmp_path):
    root = tmp_path / "data"
    assert C.folder_repeats(str(root / "10_mychar" / "a.png"), str(root)) == 10
    assert C.folder_repeats(str(root / "3_a_b" / "deep" / "a.png"), str(root)) == 3
    assert C.folder_repeats(str(root / "mychar" / "a.png"), str(root)) is None
    assert C.folder_repeats(str(root / "10mychar" / "a.png"), str(root)) is None
    assert C.folder_repeats(str(root / "10_a.png"), str(root)) is None  # a file, not a folder
    assert C.folder_repeats(str(tmp_path / "7_other" / "a.png"), str(root)) is None  # outside root
    refs = [str(root / "10_x" / "a.png"), str(root / "b.png"), b"raw bytes", str(root / "y" / "c.png")]
    on = C.CaptionConfig(num_repeats=2, repeats_from_folders=True)
    assert C.sample_repeats(refs, on, str(root)) == [10, 2, 2, 2]
    assert C.sample_repeats(refs, C.CaptionConfig(num_repeats=2), str(root)) == [2, 2, 2, 2]
    assert C.sample_repeats(refs, C.CaptionConfig(), str(root)) is None  # all once: today's sampler
    with pytest.raises(C.RepeatsError, match="'0_skip'"):
        C.sample_repeats([str(root / "0_skip" / "a.png")], on, str(root))


def test_sampler_yields_each_index_its_repeats_and_is_unchanged_without(tiny_data):
    indices = [0, 2, 5]
    plain = D.EpochSampler(indices, seed=3)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        order = np.random.default_rng([3, 104729, epoch]).permutation(3)  # today's rule, written out
        assert list(plain) == [(indices[p], epoch) for p in order]
    rep = D.EpochSampler(indices, seed=3, repeats=[1, 9, 3, 9, 9, 2])
    rep.set_epoch(1)
    keys = list(rep)
    assert len(rep) == len(keys) == 6
    counts = {i: sum(k[0] == i for k in keys) for i in indices}
    assert counts == {0: 1, 2: 3, 5: 2}
    assert sorted(k for k in keys if len(k) == 3) == [(2, 1, 1), (2, 1, 2), (5, 1, 1)]


def _tag_folder(root: Path, n: int = 8, subdirs: dict | None = None) -> Path:
    """An imagefolder whose captions are 4 comma-separated tags; ``subdirs`` maps image i to a folder."""
    make_imagefolder(root, n=n, list_captions=False)
    lines = []
    for i in range(n):
        name = f"img_{i}.png"
        if subdirs and i in subdirs:
            (root / subdirs[i]).mkdir(exist_ok=True)
            (root / name).rename(root / subdirs[i] / name)
            name = f"{subdirs[i]}/{name}"
        lines.append({"file_name": name, "text": f"id{i}, red, round, big"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_folder_repeats_reach_the_loader(tmp_path):
    root = _tag_folder(tmp_path / "d", n=4, subdirs={1: "3_char", 2: "other"})
    cfg = _cfg(root, "--repeats_from_folders", num_repeats=2)
    data = D.build_train_data(cfg, seed=0)
    by_name = {Path(r).name: data.repeats[i] for i, r in enumerate(data.refs)}
    assert by_name == {"img_0.png": 2, "img_1.png": 3, "img_2.png": 2, "img_3.png": 2}
    ds = D.TrainDataset(data, 32, True, False, seed=0)
    dl = D.make_dataloader(ds, batch_size=2, num_workers=0, seed=0)
    assert len(dl.sampler) == 9 and len(dl) == 5
    seen = [i for b in dl for i in b["index"].tolist()]
    assert sorted(seen) == sorted([i for i, r in enumerate(data.repeats) for _ in range(r)])
    assert D.build_train_data(_cfg(root), seed=0).repeats is None
    (root / "3_char").rename(root / "0_char")
    (root / "metadata.jsonl").write_text((root / "metadata.jsonl").read_text().replace("3_char", "0_char"))
    with pytest.raises(D.DataError, match="0_char"):
        D.build_train_data(cfg, seed=0)


# --------------------------------------------------------------------------- the dataset

def test_augmentation_off_is_todays_dataset_bit_for_bit(tmp_path):
    root = make_imagefolder(tmp_path / "d", n=4)
    data = D.build_train_data(_cfg(root), seed=0)
    off = D.TrainDataset(data, 32, False, True, seed=11, augment=C.CaptionConfig())
    shuffled = D.TrainDataset(data, 32, False, True, seed=11, augment=C.CaptionConfig(shuffle_caption=True))
    for index in range(4):
        for epoch in range(3):
            # today's __getitem__, written out: caption pick, flip, crop from rng(seed, epoch, index)
            rng = np.random.default_rng([11, epoch, index])
            caps = data.captions[index]
            caption = caps[int(rng.integers(len(caps)))]
            flip = bool(rng.random() < 0.5)
            pixels = image_ops.preprocess(load_rgb(data.refs[index]), 32, False, flip, rng)
            item = off[(index, epoch)]
            assert item["caption"] == caption and torch.equal(item["pixel_values"], pixels)
            # captions without tags: a shuffle changes no caption and no image draw
            other = shuffled[(index, epoch)]
            assert other["caption"] == caption and torch.equal(other["pixel_values"], pixels)


def test_shuffled_captions_are_fixed_by_seed_epoch_index(tmp_path):
    root = _tag_folder(tmp_path / "d")
    aug = C.CaptionConfig(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.2)
    cfg = _cfg(root)
    # two processes: two independently built datasets
    a = D.TrainDataset(D.build_train_data(cfg, seed=4), 32, True, True, seed=4, augment=aug)
    b = D.TrainDataset(D.build_train_data(cfg, seed=4), 32, True, True, seed=4, augment=aug)
    keys = [(i, e) for e in range(6) for i in range(8)] + [(3, 2, 1), (3, 2, 2)]
    caps = [a[k]["caption"] for k in keys]
    assert caps == [b[k]["caption"] for k in keys]
    for key, cap in zip(keys, caps):
        i, tags = key[0], cap.split(", ")
        assert tags[0] == f"id{i}" and set(tags[1:]) <= {"red", "round", "big"}
    assert len({c for k, c in zip(keys, caps) if k[0] == 0}) > 1  # varies with the epoch

    def by_hand(entropy, i):
        # the caption sub-stream of the key: 3 shuffle keys (red, round, big), then 3 tag-dropout draws
        u = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(0x43415054,))).random(6)
        rest = [t for _, t in sorted(zip(u[:3], ["red", "round", "big"]))]
        return ", ".join([f"id{i}"] + [t for t, d in zip(rest, u[3:]) if d >= 0.2])

    assert a[(6, 5)]["caption"] == by_hand([4, 5, 6], 6)
    assert caps[-2:] == [by_hand([4, 2, 3, 1], 3), by_hand([4, 2, 3, 2], 3)]  # each repeat its own draws
    # caption dropout 1: every caption blank
    blank = D.TrainDataset(a.data, 32, True, True, seed=4, augment=C.CaptionConfig(caption_dropout_rate=1.0))
    assert {blank[k]["caption"] for k in keys} == {""}


def test_each_item_names_the_dataset_wording_its_caption_was_made_from(tmp_path):
    root = _tag_folder(tmp_path / "d")
    data = D.build_train_data(_cfg(root), seed=4)
    aug = C.CaptionConfig(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.5)
    ds = D.TrainDataset(data, 32, True, True, seed=4, augment=aug, proportion_empty_prompts=0.3)
    items = [ds[(i, e)] for e in range(4) for i in range(8)]
    for item in items:
        entry = data.captions[item["index"]]
        assert item["source_caption"] in (entry if isinstance(entry, list) else [entry])
    assert any(x["caption"] != x["source_caption"] for x in items)          # augmented or blanked
    assert any(x["caption"] == "" and x["source_caption"] for x in items)   # a blank row keeps its wording
    batch = D.collate(items[:3])
    assert batch["source_caption"] == [x["source_caption"] for x in items[:3]]


# --------------------------------------------------------------------------- the trainer

def _recording(monkeypatch):
    from memreg.training import loop

    seen = []
    inner = loop._micro_step

    def micro_step(run_, batch):
        seen.append((run_.global_step, list(batch["caption"]), batch["index"].tolist()))
        return inner(run_, batch)

    monkeypatch.setattr(loop, "_micro_step", micro_step)
    return seen


def test_trainer_sees_shuffled_captions_and_a_resume_sees_the_same(tiny_sd_eps, tmp_path, monkeypatch):
    root = _tag_folder(tmp_path / "d")
    kw = dict(shuffle_caption="true", keep_tokens=1, checkpointing_steps=2, random_flip="false")
    seen = _recording(monkeypatch)
    run(tiny_sd_eps, root, tmp_path / "full", steps=4, **kw)
    full = list(seen)
    assert [s for s, _, _ in full] == [0, 1, 2, 3]
    raw = {f"id{i}, red, round, big" for i in range(8)}
    caps = [c for _, cs, _ in full for c in cs]
    assert len(caps) == 16 and any(c not in raw for c in caps)  # shuffled
    assert all(c.startswith(f"id{i}, ") for _, cs, ix in full for c, i in zip(cs, ix))  # keep_tokens 1
    # epoch 0 (steps 0-1) and epoch 1 (steps 2-3) see each image once, not always in the same order
    per_epoch = [{i: c for _, cs, ix in full[e * 2:e * 2 + 2] for c, i in zip(cs, ix)} for e in (0, 1)]
    assert any(per_epoch[0][i] != per_epoch[1][i] for i in range(8))
    seen.clear()
    run(tiny_sd_eps, root, tmp_path / "resumed", steps=4, stop_at_step=2, **kw)
    run(tiny_sd_eps, root, tmp_path / "resumed", steps=4, resume_from_checkpoint="latest", **kw)
    assert seen == full
