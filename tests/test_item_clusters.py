"""The trainer's item index (memreg/training/item_clusters.py): which rows are one item, the cache,
resuming after a crash, shards over processes, the config key, and the gate flagging a whole cluster."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from memreg.audit.near_dup import planted_copy
from memreg.demo.data import load_photo
from memreg.duplicates import content_hash
from memreg.keys import text_key
from memreg.training import item_clusters as ic

SIDE = 64
# the photo's five rows (two exact copies, a JPEG re-encode, a 90% centre crop resized back, a mirror),
# then two other photos
KINDS = ("photo", "copy", "jpeg", "crop90", "hflip", "other_a", "other_b")
PHOTO_ROWS = 5


def _rows() -> list[Image.Image]:
    photo = load_photo("astronaut", SIDE)
    rng = np.random.default_rng(0)
    c = round(SIDE * 0.05)
    crop = photo.crop((c, c, SIDE - c, SIDE - c)).resize((SIDE, SIDE), Image.BICUBIC)
    return [photo, photo.copy(), planted_copy(photo, "jpeg", rng), crop, planted_copy(photo, "hflip", rng),
            load_photo("coffee", SIDE), load_photo("camera", SIDE)]


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for kind, img in zip(KINDS, _rows()):
        img.save(root / f"{kind}.png")
        paths.append(str(root / f"{kind}.png"))
    return paths


@pytest.fixture
def count_hashes(monkeypatch):
    """The rows hashed (by position in the list handed to hash_image's caller) since the fixture started."""
    calls: list = []
    real = ic.hash_image

    def counted(image, near):
        calls.append(image)
        return real(image, near)
    monkeypatch.setattr(ic, "hash_image", counted)
    return calls


def test_copies_jpeg_crop_and_mirror_are_one_item_and_another_photo_is_not(photo_files, tmp_path):
    idx = ic.build_item_index(photo_files, tmp_path, progress=False)
    photo_hash = content_hash(Image.open(photo_files[0]))
    assert idx.hashes[:PHOTO_ROWS] == [photo_hash] * PHOTO_ROWS       # named by the first row's pixels
    assert idx.groups() == [list(range(PHOTO_ROWS))]
    assert [idx.count(i) for i in range(len(KINDS))] == [5, 5, 5, 5, 5, 1, 1]
    keys = idx.item_keys()
    assert len(set(keys[:PHOTO_ROWS])) == 1 and keys[0] == text_key(photo_hash, seed=1)
    assert len(set(keys)) == 3
    # a row without near-duplicates keeps its exact-pixel key
    assert idx.hashes[5] == content_hash(Image.open(photo_files[5]))
    exact = ic.build_item_index(photo_files, tmp_path, kind="exact", progress=False)
    assert exact.groups() == [[0, 1]] and len(set(exact.item_keys())) == 6
    assert exact.item_keys()[5:] == keys[5:] and exact.item_keys()[3] != keys[0]


def test_a_second_build_on_the_same_data_loads_the_cache(photo_files, tmp_path, count_hashes):
    first = ic.build_item_index(photo_files, tmp_path, progress=False)
    assert len(count_hashes) == len(KINDS)
    (home,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert (home / ic.INDEX_FILE).is_file()
    again = ic.build_item_index(photo_files, tmp_path, progress=False)
    assert len(count_hashes) == len(KINDS) and again.hashes == first.hashes    # nothing hashed
    ic.build_item_index(photo_files, tmp_path, kind="exact", progress=False)  # another setting: its own index
    assert len(count_hashes) == 2 * len(KINDS)
    st = os.stat(photo_files[6])
    os.utime(photo_files[6], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))     # a file changed: hashed again
    ic.build_item_index(photo_files, tmp_path, progress=False)
    assert len(count_hashes) == 3 * len(KINDS)
    assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 3


def test_a_build_killed_mid_shards_resumes_from_the_finished_ones(photo_files, tmp_path, monkeypatch):
    real, calls = ic.hash_image, []

    def dies_on_the_fifth(image, near):
        calls.append(image)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(image, near)
    monkeypatch.setattr(ic, "hash_image", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        ic.build_item_index(photo_files, tmp_path / "cache", shard_size=2, progress=False)
    (home,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in (home / "parts").glob("shard-*")) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    calls.clear()
    monkeypatch.setattr(ic, "hash_image", lambda image, near: (calls.append(image), real(image, near))[1])
    resumed = ic.build_item_index(photo_files, tmp_path / "cache", shard_size=2, progress=False)
    assert calls == photo_files[4:]                       # rows 4, 5, 6: shards 2 and 3 only
    fresh = ic.build_item_index(photo_files, tmp_path / "fresh", shard_size=2, progress=False)
    assert resumed.hashes == fresh.hashes and resumed.groups() == [list(range(PHOTO_ROWS))]


def test_two_processes_hash_their_own_shards_and_agree_with_one(photo_files, tmp_path, monkeypatch):
    """Two ranks as threads meeting at a barrier: rank r hashes shards r, r+2 (rows 0-1, 4-5 / 2-3, 6)."""
    real, by_rank = ic.hash_image, {0: [], 1: [], None: []}
    local = threading.local()
    monkeypatch.setattr(ic, "hash_image",
                        lambda image, near: (by_rank[getattr(local, "rank", None)].append(image), real(image, near))[1])
    meet, out, errors = threading.Barrier(2, timeout=60), {}, []

    def rank(r):
        local.rank = r
        try:
            out[r] = ic.build_item_index(photo_files, tmp_path / "two", shard_size=2, rank=r, world=2,
                                         barrier=meet.wait, progress=r == 0)
        except Exception as e:      # pragma: no cover - shown by the assert below
            errors.append(e)
            meet.abort()
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert by_rank[0] == photo_files[0:2] + photo_files[4:6] and by_rank[1] == photo_files[2:4] + photo_files[6:]
    one = ic.build_item_index(photo_files, tmp_path / "one", shard_size=2, progress=False)
    assert out[0].hashes == out[1].hashes == one.hashes


def test_an_unreadable_image_is_named_and_its_shard_hashed_again(photo_files, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    bad = root / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = photo_files[:2] + [str(bad)]
    with pytest.raises(ic.ItemClusterError, match=r"item clusters: training image '.*broken\.png': ") as e:
        ic.build_item_index(rows, tmp_path / "cache", shard_size=2, progress=False)
    assert "\n" not in str(e.value)
    (home,) = (tmp_path / "cache").iterdir()
    assert [p.name for p in (home / "parts").glob("shard-*")] == ["shard-00000.jsonl"]   # the bad one removed
    assert json.loads((home / ic.ERROR_FILE).read_text())["error"].startswith("training image")


def test_the_config_key_is_checked_with_one_line(tmp_path):
    from memreg.monitor_config import EvalConfig
    from memreg.training.config import ConfigError, load_config

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")
    assert load_config(["--config", tiny]).eval.item_clusters == "near"
    assert load_config(["--config", tiny, "--eval.item_clusters", "exact"]).eval.item_clusters == "exact"
    with pytest.raises(ConfigError) as e:
        load_config(["--config", tiny, "--eval.item_clusters", "fuzzy"])
    assert str(e.value) == "eval.item_clusters: must be one of ('near', 'exact') (got 'fuzzy')"
    afile = tmp_path / "a_file"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"^eval.item_clusters_dir: exists and is not a directory"):
        EvalConfig(item_clusters_dir=str(afile))
    assert ic.cache_root(EvalConfig(), "out/run") == Path("out/run") / "item_clusters"
    assert ic.cache_root(EvalConfig(item_clusters_dir=str(tmp_path)), "out/run") == tmp_path


def test_the_run_index_takes_duplicates_from_when_given(photo_files, tmp_path):
    """``eval.duplicates_from`` wins over ``eval.item_clusters``: the audit's cluster keys."""
    from memreg.monitor_config import EvalConfig
    from memreg.training.loop import _Run

    clusters = tmp_path / "clusters.jsonl"
    member = {"sha256": content_hash(Image.open(photo_files[5]))}
    clusters.write_text(json.dumps({"cluster": 7, "members": [member]}) + "\n")

    def fake_run(**eval_kw):
        data = SimpleNamespace(refs=photo_files, train_idx=list(range(len(photo_files))),
                               records=lambda which: [{"image": p, "caption": "x", "id": i}
                                                      for i, p in enumerate(photo_files)])
        cfg = SimpleNamespace(eval=EvalConfig(**eval_kw), output_dir=str(tmp_path / "out"))
        acc = SimpleNamespace(process_index=0, num_processes=1, is_main_process=False, wait_for_everyone=lambda: None)
        return _Run(cfg=cfg, accelerator=acc, models=None, data=data, encoder=None, prediction_type="epsilon")
    audit = fake_run(duplicates_from=str(clusters)).dup_index()
    assert audit.hashes[5] == "cluster:7" and audit.groups() == [[0, 1]]
    near = fake_run().dup_index()
    assert near.groups() == [list(range(PHOTO_ROWS))] and (tmp_path / "out" / "item_clusters").is_dir()


def _write_folder(root: Path, photo_files: list[str], rows: list[int], captions: list[str]) -> Path:
    root.mkdir(parents=True)
    lines = []
    for j, (i, cap) in enumerate(zip(rows, captions)):
        name = f"row_{j}.png"
        Image.open(photo_files[i]).save(root / name)        # 64 px; the trainer resizes to 32
        lines.append({"file_name": name, "text": cap})
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_the_trainer_gates_every_row_of_a_flagged_cluster_whatever_its_caption(photo_files, tiny_sd_eps, tmp_path,
                                                                              count_hashes):
    """Six rows: the photo's five (each with its own caption) and another photo. Every probe fires
    (tau -inf); a batch of 4 holds >= 3 of the photo's rows, so its cluster is flagged at step 0, and
    then every row of it weighs 0 in the loss, the never-probed wordings of the crop and the mirror too."""
    from memreg.testing import load_script
    from memreg.training.config import load_config
    from memreg.training.data import build_train_data

    h = load_script(Path(__file__).resolve().parent / "training" / "conftest.py")
    captions = ["an astronaut", "a woman in a space suit", "a portrait, nasa", "an astronaut, close up",
                "a mirrored astronaut", "a cup of coffee"]
    data = _write_folder(tmp_path / "data", photo_files, [0, 1, 2, 3, 4, 5], captions)
    gate = dict(guard__type="penalty", guard__gate=True, guard__every_n_steps=1, guard__probes_per_step=2,
                guard__term="norm", guard__reference="none", guard__zscore="none", guard__tau=-1e9,
                guard__weight=0.0, guard__calibration_prompts=4, guard__calibration_seeds=1)
    res = h.run(tiny_sd_eps, data, tmp_path / "run", steps=2, **gate)
    assert len(count_hashes) == 6                                   # hashed once for the run
    cfg = load_config(h.base_argv(tiny_sd_eps, data, tmp_path / "run"))
    train = build_train_data(cfg, seed=0)
    refs = [train.refs[i] for i in train.train_idx]
    idx = ic.build_item_index(refs, ic.cache_root(cfg.eval, cfg.output_dir), progress=False)
    assert len(count_hashes) == 6                                   # the run's cache, loaded
    import torch

    keys = torch.tensor(idx.item_keys())
    photo = [i for i, r in enumerate(refs) if Path(r).name in {f"row_{j}.png" for j in range(PHOTO_ROWS)}]
    assert len(set(keys[photo].tolist())) == 1 and len(set(keys.tolist())) == 2
    flagged = res.guard.gate.flagged
    assert flagged <= set(keys.tolist()) and int(keys[photo[0]]) in flagged
    assert res.guard.gate.weights(keys[photo]).tolist() == [0.0] * PHOTO_ROWS
