"""Training data: imagefolder loading, checks, corrupt images, held-out split, sampling, transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from memreg import image_ops
from memreg.training import data as D
from memreg.training.config import load_config
from .conftest import TINY_CONFIG, make_imagefolder


def _cfg(data_dir, **kw):
    argv = ["--config", str(TINY_CONFIG), "--train_data_dir", str(data_dir)]
    for k, v in kw.items():
        argv += [f"--{k.replace('__', '.')}", str(v)]
    return load_config(argv)


def test_imagefolder_loads_with_list_captions(tiny_data):
    data = D.build_train_data(_cfg(tiny_data), seed=0)
    assert data.summary.num_total == 8 and data.summary.skipped == 0
    assert data.captions[1] == ["a blue square", "a blue box"]
    assert all(isinstance(r, str) for r in data.refs)


def test_missing_train_data_dir_is_a_named_error(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.build_train_data(_cfg(tmp_path / "nope"), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="metadata.jsonl"):
        D.build_train_data(_cfg(tmp_path / "empty"), seed=0)


def test_absent_caption_column_is_a_named_error(tmp_path):
    root = make_imagefolder(tmp_path / "d", n=3, caption_key="prompt")
    with pytest.raises(D.DataError, match=r"caption_column 'text'.*columns: \['image', 'prompt'\]"):
        D.build_train_data(_cfg(root), seed=0)
    assert D.build_train_data(_cfg(root, caption_column="prompt"), seed=0).summary.num_total == 3


def test_corrupt_images_are_skipped_with_a_count(tmp_path, caplog):
    root = make_imagefolder(tmp_path / "d", n=4, corrupt=2)
    with caplog.at_level("WARNING"):
        data = D.build_train_data(_cfg(root), seed=0)
    assert data.summary.skipped == 2 and data.summary.num_train == 4
    assert "bad_0.png" in data.summary.skipped_examples[0]
    assert "skipped 2 unreadable image(s)" in caplog.text
    assert all("bad_" not in r for r in data.refs)


def test_all_corrupt_is_a_named_error(tmp_path):
    root = make_imagefolder(tmp_path / "d", n=0, corrupt=2)
    with pytest.raises(D.DataError, match="none of its 2 images"):
        D.build_train_data(_cfg(root), seed=0)


def test_decode_failure_after_the_check_names_the_file(tmp_path):
    root = make_imagefolder(tmp_path / "d", n=2)
    data = D.build_train_data(_cfg(root), seed=0)
    (root / "img_1.png").write_bytes(b"gone bad")
    ds = D.TrainDataset(data, 32, True, False, seed=0)
    with pytest.raises(D.CorruptImageError, match="img_1.png"):
        ds[(1, 0)]


def test_heldout_split_is_seeded_and_never_trained_on(tiny_data):
    cfg = _cfg(tiny_data, eval__heldout_fraction=0.25)
    a = D.build_train_data(cfg, seed=5)
    b = D.build_train_data(cfg, seed=5)
    assert a.heldout_idx == b.heldout_idx and len(a.heldout_idx) == 2
    assert not set(a.heldout_idx) & set(a.train_idx) and len(a.train_idx) == 6
    ds = D.TrainDataset(a, 32, True, False, seed=5)
    sampler = D.EpochSampler(a.train_idx, seed=5)
    seen = {idx for epoch in range(3) for idx, _ in (sampler.set_epoch(epoch) or sampler)}
    assert seen == set(a.train_idx)
    recs = a.records("heldout")
    assert [r["id"] for r in recs] == a.heldout_idx and all({"image", "caption", "id"} <= set(r) for r in recs)
    assert len(ds) == 6
    c = D.build_train_data(cfg, seed=6)
    assert c.heldout_idx != a.heldout_idx or len(a.train_idx) == 1


def test_caption_choice_and_flip_depend_only_on_seed_epoch_index(tiny_data):
    data = D.build_train_data(_cfg(tiny_data), seed=0)
    ds = D.TrainDataset(data, 32, True, True, seed=0)
    picks = {ds[(1, e)]["caption"] for e in range(20)}
    assert picks == {"a blue square", "a blue box"}  # a random choice per epoch
    a, b = ds[(1, 3)], ds[(1, 3)]
    assert a["caption"] == b["caption"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_sampler_and_skip_first_batches_replay_the_same_batches(tiny_data):
    from accelerate import Accelerator

    data = D.build_train_data(_cfg(tiny_data), seed=0)
    ds = D.TrainDataset(data, 32, True, True, seed=0)
    acc = Accelerator(cpu=True)
    dl = acc.prepare(D.make_dataloader(ds, batch_size=2, num_workers=0, seed=0))
    dl.set_epoch(1)
    full = [b["index"].tolist() for b in dl]
    dl.set_epoch(0)
    other = [b["index"].tolist() for b in dl]
    assert full != other  # reshuffled per epoch
    skipped = acc.skip_first_batches(dl, 2)
    skipped.set_epoch(1)
    assert [b["index"].tolist() for b in skipped] == full[2:]


def test_image_ops_match_hand_computation():
    arr = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)  # H=6, W=4
    img = Image.fromarray(arr)
    r = image_ops.resize_shorter(img, 2)
    assert r.size == (2, 3)  # shorter side (W=4) -> 2, H = int(2 * 6 / 4) = 3
    assert image_ops.crop_box_center(4, 6, 4) == (1, 0)
    c = image_ops.crop(img, 1, 0, 4)
    assert np.array_equal(np.asarray(c), arr[1:5, 0:4])
    f = image_ops.hflip(img)
    assert np.array_equal(np.asarray(f), arr[:, ::-1])
    t = image_ops.to_tensor_normalized(img)
    assert t.shape == (3, 6, 4)
    assert torch.allclose(t, torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32)) / 255 * 2 - 1)


def test_latent_cache_matches_the_vae(tiny_data, eps_components):
    data = D.build_train_data(_cfg(tiny_data), seed=0)
    vae = eps_components.vae
    cache = D.build_latent_cache(data, vae, 32, True, "cpu", torch.float32)
    assert cache["mean"].shape == (8, 2, 4, 16, 16)
    ds = D.TrainDataset(data, 32, True, True, seed=0, latent_cache=cache)
    plain = D.TrainDataset(data, 32, True, True, seed=0)
    item, ref = ds[(2, 4)], plain[(2, 4)]
    with torch.no_grad():
        mean = vae.encode(ref["pixel_values"][None]).latent_dist.mean[0]
    assert torch.allclose(item["latent_mean"], mean, atol=1e-5)
    assert item["caption"] == ref["caption"]


def test_proportion_empty_prompts_blanks_that_fraction_deterministically(tmp_path):
    root = make_imagefolder(tmp_path / "d", n=8)
    data = D.build_train_data(_cfg(root), seed=0)
    ds = D.TrainDataset(data, 32, True, False, seed=0, proportion_empty_prompts=0.5)
    plain = D.TrainDataset(data, 32, True, False, seed=0)
    caps = [ds[(i, e)]["caption"] for e in range(25) for i in range(8)]
    assert caps == [ds[(i, e)]["caption"] for e in range(25) for i in range(8)]
    blank = sum(c == "" for c in caps) / len(caps)
    assert 0.4 < blank < 0.6
    assert all(plain[(i, 0)]["caption"] for i in range(8))


def test_empty_metadata_is_a_named_error(tmp_path):
    root = make_imagefolder(tmp_path / "d", n=2)
    (root / "metadata.jsonl").write_text("\n  \n")
    with pytest.raises(D.DataError, match=r"metadata.jsonl has no records"):
        D.build_train_data(_cfg(root), seed=0)


def test_malformed_metadata_line_is_named_by_its_line_in_the_file(tmp_path):
    root = make_imagefolder(tmp_path / "d", n=2)
    good = (root / "metadata.jsonl").read_text().splitlines()
    # line 1 ok, line 2 blank, line 3 broken: datasets would call it "row 2"
    (root / "metadata.jsonl").write_text(good[0] + "\n\n" + '{"file_name": "img_1.png", "text": \n')
    with pytest.raises(D.DataError, match=r"metadata.jsonl:3: not valid JSON"):
        D.build_train_data(_cfg(root), seed=0)
    (root / "metadata.jsonl").write_text(good[0] + "\n" + '["img_1.png"]\n')
    with pytest.raises(D.DataError, match=r"metadata.jsonl:2: expected a JSON object, got list"):
        D.build_train_data(_cfg(root), seed=0)
    (root / "metadata.jsonl").write_text(good[0] + "\n" + '{"text": "x"}\n')
    with pytest.raises(D.DataError, match=r"metadata.jsonl:2: record has no 'file_name'"):
        D.build_train_data(_cfg(root), seed=0)


def test_train_entry_reports_bad_metadata_in_one_line_with_exit_2(tmp_path, tiny_sd_eps):
    import subprocess
    import sys

    from .conftest import REPO, base_argv

    root = make_imagefolder(tmp_path / "d", n=2)
    (root / "metadata.jsonl").write_text("")
    proc = subprocess.run([sys.executable, str(REPO / "train" / "train.py"),
                           *base_argv(tiny_sd_eps, root, tmp_path / "out", steps=1)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: DataError:") and "has no records" in lines[-1]
    assert "Traceback" not in proc.stderr
