"""MemorizationMonitor (memreg/monitor.py) on the tiny pipeline with a planted-duplicate dataset."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memreg.monitor import GROUPS, MemorizationMonitor, subsample
from memreg.monitor_config import EvalConfig

TERMS = ("norm", "align", "score")


def make_accelerator(project_dir, run_name: str = "run", log_with="tensorboard"):
    """A real CPU ``accelerate.Accelerator`` whose TensorBoard tracker writes under project_dir/run_name."""
    from accelerate import Accelerator

    acc = Accelerator(log_with=log_with, project_dir=str(project_dir))
    acc.init_trackers(run_name)
    return acc


def read_events(log_dir):
    """Scalar, histogram, image and tensor (text) tags of the event files under ``log_dir``."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    dirs = sorted({p.parent for p in Path(log_dir).rglob("events.out.tfevents.*")})
    assert dirs, f"no event files under {log_dir}"
    tags = {"scalars": {}, "histograms": set(), "images": {}, "tensors": set()}
    for d in dirs:
        acc = ea.EventAccumulator(str(d), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0})
        acc.Reload()
        for t in acc.Tags()["scalars"]:
            tags["scalars"][t] = {e.step: e.value for e in acc.Scalars(t)}
        tags["histograms"] |= set(acc.Tags()["histograms"])
        for t in acc.Tags()["images"]:
            tags["images"][t] = [(e.step, e.width, e.height) for e in acc.Images(t)]
        tags["tensors"] |= set(acc.Tags()["tensors"])
    return tags


@pytest.fixture(scope="module")
def components(tiny_sd_eps):
    from memreg.models import load_components

    return load_components(str(tiny_sd_eps))  # own copy: these tests toggle train mode


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """7 training records: image A three times (two files with other names + in memory), 4 unique ones
    (one differs from A by a single bit), 2 held-out records, and memorized/reference prompt files."""
    root = tmp_path_factory.mktemp("monitor_data")
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    ims[0].save(root / "dup_a.png")
    ims[0].save(root / "renamed_copy.png", compress_level=0)
    near = np.asarray(ims[0]).copy()
    near[5, 5, 1] ^= 1
    train = [
        {"image": str(root / "dup_a.png"), "caption": "a red circle on a blue background", "id": 0},
        {"image": ims[1], "caption": ["a photo of a dog", "an alternative caption"], "id": 1},
        {"image": str(root / "renamed_copy.png"), "caption": "a red circle", "id": 2},
        {"image": ims[2], "caption": "a photo of a cat", "id": 3},
        {"image": ims[0].copy(), "caption": "a red circle on a blue background", "id": 4},
        {"image": Image.fromarray(near), "caption": "a nearly identical picture", "id": 5},
        {"image": ims[3], "caption": "a green tree near a river", "id": 6},
    ]
    heldout = [{"image": ims[4], "caption": "a yellow star at night", "id": 100},
               {"image": ims[5], "caption": ["an old house with a door", "x"], "id": 101}]
    (root / "mem.txt").write_text("a red circle on a blue background\nthe moon over the sea\n")
    (root / "ref.jsonl").write_text('{"caption": "a bird in a garden"}\n{"caption": "a car on a road"}\n')
    return {"root": root, "train": train, "heldout": heldout,
            "dup_captions": ["a red circle on a blue background", "a red circle"],
            "unique_captions": ["a photo of a dog", "a photo of a cat", "a nearly identical picture",
                                "a green tree near a river"]}


def eval_cfg(dataset, **kw) -> EvalConfig:
    base = dict(enabled=True, every_n_steps=2, seeds=1, batch_size=4, max_prompts_per_group=8, top_k=5,
                memorized_prompts=str(dataset["root"] / "mem.txt"),
                reference_prompts=str(dataset["root"] / "ref.jsonl"),
                generate_every_n_steps=0, generate_at_end=True, max_generate_prompts=2,
                num_images_per_prompt=1, num_inference_steps=2, guidance_scale=3.0)
    base.update(kw)
    return EvalConfig(**base)


@pytest.fixture(scope="module")
def monitored_run(components, dataset, tmp_path_factory):
    """Steps 0..3 with every_n_steps=2, then final=True at 3; the global RNG and train mode watched."""
    root = tmp_path_factory.mktemp("monitor_run")
    acc = make_accelerator(root / "logs")
    mon = MemorizationMonitor(eval_cfg(dataset), components=components, train_records=dataset["train"],
                              heldout_records=dataset["heldout"], accelerator=acc, output_dir=root / "out")
    unet = components.unet
    unet.train()
    unet.conv_in.eval()  # a submodule deliberately in another mode must come back as it was
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    results = {}
    for step in range(4):
        results[step] = mon.maybe_run(step, unet=unet)
    results["final"] = mon.maybe_run(3, unet=unet, final=True)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    modes = (unet.training, unet.conv_in.training, components.text_encoder.training)
    unet.eval()
    acc.end_training()
    return {"root": root, "monitor": mon, "results": results, "rng": (before, after), "modes": modes}


def test_schedule(monitored_run):
    r = monitored_run["results"]
    assert r[1] is None and r[3] is None
    assert "eval/seconds" in r[0] and "eval/seconds" in r[2] and "copy/seconds" not in r[2]
    assert "eval/seconds" in r["final"] and "copy/seconds" in r["final"]
    assert monitored_run["monitor"].done_detect == {0, 2, 3}
    assert monitored_run["monitor"].done_copy == {3}


def test_rng_and_train_mode_untouched(monitored_run):
    (t0, p0, n0), (t1, p1, n1) = monitored_run["rng"]
    assert torch.equal(t0, t1)
    assert p0 == p1
    assert n0[0] == n1[0] and np.array_equal(n0[1], n1[1]) and n0[2:] == n1[2:]
    assert monitored_run["modes"] == (True, False, False)


def test_fixed_probe_noise_gives_identical_evals(monitored_run):
    r = monitored_run["results"]
    for g in GROUPS:
        assert r[0][f"eval/{g}/score_mean"] == pytest.approx(r[2][f"eval/{g}/score_mean"], abs=1e-6)


def test_groups_from_content_duplicates(monitored_run, dataset):
    groups = monitored_run["monitor"].groups()
    assert set(groups) == set(GROUPS)
    assert [p.text for p in groups["duplicated"]] == dataset["dup_captions"]
    assert [p.dup_count for p in groups["duplicated"]] == [3, 3]
    assert [p.text for p in groups["unique"]] == dataset["unique_captions"]
    assert [p.text for p in groups["heldout"]] == ["a yellow star at night", "an old house with a door"]
    assert [p.text for p in groups["memorized"]] == ["a red circle on a blue background", "the moon over the sea"]
    assert groups["memorized"][0].dup_count == 3  # a file prompt that is a training caption knows its image
    assert [p.text for p in groups["reference"]] == ["a bird in a garden", "a car on a road"]


def test_every_tag_in_event_files(monitored_run):
    ev = read_events(monitored_run["root"] / "logs")
    scalars = ev["scalars"]
    for g in GROUPS:
        for t in TERMS:
            for q in ("mean", "p50", "p95"):
                assert set(scalars[f"eval/{g}/{t}_{q}"]) == {0, 2, 3}
            assert f"eval_hist/{g}/{t}" in ev["histograms"]
        for name in ("memorized_frac", "sim_mean", "sim_p95"):
            assert set(scalars[f"copy/{g}/{name}"]) == {3}
        assert 0.0 <= scalars[f"copy/{g}/memorized_frac"][3] <= 1.0
        assert f"copy_hist/{g}/similarity" in ev["histograms"]
        assert [s for s, _, _ in ev["images"][f"copy_grid/{g}"]] == [3]
    for g in ("duplicated", "unique", "memorized"):   # groups with their own training image
        assert f"copy/{g}/own_sim_mean" in scalars
    for c in ("duplicated_vs_heldout", "duplicated_vs_unique", "memorized_vs_reference"):
        for t in TERMS:
            assert 0.0 <= scalars[f"eval/auc/{c}/{t}"][0] <= 1.0
            assert f"eval/tpr_at_1pct_fpr/{c}/{t}" in scalars
    assert set(scalars["eval/seconds"]) == {0, 2, 3} and set(scalars["copy/seconds"]) == {3}
    assert [s for s, _, _ in ev["images"]["eval/roc"]] == [0, 2, 3]
    assert "eval/top_k_captions/text_summary" in ev["tensors"]


def test_json_results_written(monitored_run):
    import json

    out = monitored_run["root"] / "out" / "memorization"
    assert sorted(p.name for p in out.iterdir()) == ["copy_step00000003.json", "eval_step00000000.json",
                                                      "eval_step00000002.json", "eval_step00000003.json"]
    rec = json.loads((out / "eval_step00000003.json").read_text())
    assert {d["prompt"] for d in rec["groups"]["duplicated"]} == {"a red circle on a blue background", "a red circle"}
    copy = json.loads((out / "copy_step00000003.json").read_text())
    assert all(0 <= d["nearest_record_id"] <= 6 for d in copy["groups"]["duplicated"])
    assert copy["scalars"]["copy/threshold"] == 0.5


def test_auc_matches_hand_count(monitored_run):
    """AUC = P(pos > neg) + 0.5 P(tie), counted by hand from the per-prompt scores."""
    import json

    rec = json.loads((monitored_run["root"] / "out" / "memorization" / "eval_step00000000.json").read_text())
    pos = [d["score"] for d in rec["groups"]["duplicated"]]
    neg = [d["score"] for d in rec["groups"]["unique"]]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert monitored_run["results"][0]["eval/auc/duplicated_vs_unique/score"] == pytest.approx(wins / (len(pos) * len(neg)))


@pytest.mark.parametrize("noise", ["shared", "per-prompt"])
def test_tensorboard_eval_scalars_agree_with_memreg_detect(monitored_run, components, dataset, tmp_path, noise):
    """The eval/<group>/*_mean scalars are the means of `memreg detect`'s scores on the same prompts
    with --seed eval.seed --seeds eval.seeds --noise eval.noise (detect's own scoring code)."""
    from memreg.detect import score_prompts
    from memreg.encoding import PromptEncoder
    from memreg.score import AnisotropyScore

    if noise == "shared":   # the monitored run itself (default noise), read back from its event files
        scalars = read_events(monitored_run["root"] / "logs")["scalars"]
        logged = {f"{g}/{t}": scalars[f"eval/{g}/{t}_mean"][0] for g in GROUPS for t in TERMS}
        groups = monitored_run["monitor"].groups()
    else:
        acc = make_accelerator(tmp_path / "logs")
        mon = MemorizationMonitor(eval_cfg(dataset, noise=noise, seeds=2), components=components,
                                  train_records=dataset["train"], heldout_records=dataset["heldout"],
                                  accelerator=acc, output_dir=tmp_path / "out")
        logged, _ = mon.run_detection(0, components.unet)
        acc.end_training()
        logged = {f"{g}/{t}": logged[f"eval/{g}/{t}_mean"] for g in GROUPS for t in TERMS}
        groups = mon.groups()
    seeds = [1234] if noise == "shared" else [1234, 1235]
    scorer = AnisotropyScore(components.unet, components.scheduler)
    encoder = PromptEncoder(components.tokenizer, components.text_encoder)
    for g in GROUPS:
        res = score_prompts(scorer, encoder, components.scheduler, [p.text for p in groups[g]], seeds=seeds,
                            batch_size=1, wen_steps=0, noise=noise)
        for t in TERMS:
            assert logged[f"{g}/{t}"] == pytest.approx(float(np.mean(res.term(t))), rel=1e-5, abs=1e-6), (g, t)


def test_subsample_is_deterministic():
    items = list(range(100))
    a = subsample(items, 10, seed=5, group="unique")
    assert a == subsample(items, 10, seed=5, group="unique") and a == sorted(a) and len(set(a)) == 10
    assert a != subsample(items, 10, seed=6, group="unique")
    assert subsample(items[:3], 10, seed=5, group="unique") == [0, 1, 2]


def test_non_main_process_and_disabled_are_noops(components, dataset):
    class NotMain:
        is_main_process = False

    mon = MemorizationMonitor(eval_cfg(dataset), components=components, train_records=dataset["train"],
                              accelerator=NotMain())
    assert mon.maybe_run(0, unet=components.unet, final=True) is None and mon.done_detect == set()
    off = MemorizationMonitor(EvalConfig(enabled=False), components=components, train_records=dataset["train"])
    assert off.maybe_run(0, unet=components.unet) is None


def test_without_tensorboard_tracker(components, dataset, tmp_path, caplog):
    acc = make_accelerator(tmp_path, log_with=None)
    mon = MemorizationMonitor(eval_cfg(dataset, generate_at_end=False, memorized_prompts=None, reference_prompts=None),
                              components=components, train_records=dataset["train"], accelerator=acc)
    with caplog.at_level(logging.WARNING, logger="memreg.monitor"):
        out = mon.maybe_run(0, unet=components.unet)
        mon.maybe_run(2, unet=components.unet)
    assert "eval/duplicated/score_mean" in out and "eval/memorized/score_mean" not in out
    assert sum("no TensorBoard tracker" in m for m in caplog.messages) == 1


def test_bad_config_fails_early(components, dataset, tmp_path):
    from memreg.prompt_io import PromptFileError

    with pytest.raises(ValueError, match="eval.dup_min_count"):
        EvalConfig(dup_min_count=1)
    with pytest.raises(ValueError, match="eval.sscd_path"):
        EvalConfig(copy_detector="sscd")
    with pytest.raises(PromptFileError, match="nope.txt"):
        MemorizationMonitor(eval_cfg(dataset, memorized_prompts=str(tmp_path / "nope.txt")), components=components)
    with pytest.raises(ValueError, match="eval.copy_detector: unknown detector 'clip'"):
        MemorizationMonitor(eval_cfg(dataset, copy_detector="clip"), components=components)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        MemorizationMonitor(eval_cfg(dataset, copy_detector="sscd", sscd_path=str(tmp_path / "missing.pt")),
                            components=components)
    late = EvalConfig(enabled=True)
    late.batch_size = 0   # as a config loader that setattr()s onto a default instance leaves it
    with pytest.raises(ValueError, match="eval.batch_size"):
        MemorizationMonitor(late, components=components)
    with pytest.raises(ValueError, match="unknown field"):
        MemorizationMonitor({"enabled": True, "evry_n_steps": 3}, components=components)


def _fake_generations(dataset, seen):
    """generate_images stand-in: captions of the duplicated image 'generate' that image, others noise."""
    dup_img = dataset["train"][4]["image"]

    def fake(components, prompts, seeds, **kw):
        seen.append((list(prompts), list(seeds)))
        rng = np.random.default_rng(99)  # not the dataset's seed: these must be non-copies
        return [dup_img.copy() if p in dataset["dup_captions"] else
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for p in prompts]
    return fake


def test_copy_check_flags_a_planted_copy(components, dataset, tmp_path, monkeypatch):
    import json

    import memreg.generation

    seen = []
    monkeypatch.setattr(memreg.generation, "generate_images", _fake_generations(dataset, seen))
    cfg = eval_cfg(dataset, every_n_steps=0, generate_every_n_steps=5, num_images_per_prompt=2)
    mon = MemorizationMonitor(cfg, components=components, train_records=dataset["train"],
                              heldout_records=dataset["heldout"], output_dir=tmp_path)
    out = mon.maybe_run(5, unet=components.unet)
    assert out["copy/duplicated/memorized_frac"] == 1.0
    assert out["copy/duplicated/own_sim_mean"] == pytest.approx(1.0, abs=1e-5)
    assert out["copy/duplicated/own_memorized_frac"] == 1.0
    assert out["copy/memorized/memorized_frac"] == 0.5      # its first prompt is the duplicated caption
    assert out["copy/unique/memorized_frac"] == 0.0 and out["copy/heldout/memorized_frac"] == 0.0
    rec = json.loads((tmp_path / "memorization" / "copy_step00000005.json").read_text())
    assert {d["nearest_record_id"] for d in rec["groups"]["duplicated"]} == {0}  # first record with those pixels
    # fixed generation seeds: per (prompt index, image index), identical across evals and groups
    prompts, seeds = seen[0]
    assert len(prompts) == 2 * 2 * 5 and seeds[:4] == seeds[4:8]
    assert len(set(seeds[:4])) == 4


def test_copy_check_with_sscd_torchscript(components, dataset, tmp_path, monkeypatch):
    import warnings

    import memreg.generation

    class Desc(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Desc()).save(str(path))
    monkeypatch.setattr(memreg.generation, "generate_images", _fake_generations(dataset, []))
    cfg = eval_cfg(dataset, every_n_steps=0, generate_every_n_steps=1, copy_detector="sscd", sscd_path=str(path),
                   memorized_prompts=None, reference_prompts=None)
    mon = MemorizationMonitor(cfg, components=components, train_records=dataset["train"],
                              heldout_records=dataset["heldout"])
    out = mon.maybe_run(0, unet=components.unet)
    assert mon.detector().name == "sscd" and out["copy/threshold"] == 0.5
    assert out["copy/duplicated/memorized_frac"] == 1.0
    assert out["copy/duplicated/own_sim_mean"] == pytest.approx(1.0, abs=1e-5)
