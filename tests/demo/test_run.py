"""memreg/demo/run.py: a toy-size smoke run of the whole demo produces every result field."""

import json
from pathlib import Path

import pytest

from memreg.demo.run import GUARDS, load_settings, run_demo, targets

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
RUN_FIELDS = {"dup_memorized_frac", "dup_own_similarity_mean", "heldout_memorized_frac",
              "heldout_photo_similarity_mean", "heldout_any_train_over_threshold", "heldout_loss", "adherence",
              "copy_threshold", "train_s", "step_time_s", "step_time_ratio", "detection"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = root / "demo_out"
    results = run_demo(CONFIG, out, quick=True, cache_dir=root / "cache")
    return out, results, root


def test_results_have_every_field(quick_demo):
    out, results, _ = quick_demo
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == set(GUARDS)
    for run in saved["runs"].values():
        assert RUN_FIELDS <= set(run)
        assert 0.0 <= run["dup_memorized_frac"] <= 1.0 and 0.0 <= run["adherence"] <= 1.0
        assert run["heldout_loss"] > 0
    assert {"norm", "align", "score"} <= set(saved["detection_none"])
    assert [t["target"] for t in saved["targets"]] == [t["target"] for t in results["targets"]]
    assert len(saved["targets"]) in (7, 8) and all(isinstance(t["pass"], bool) for t in saved["targets"])
    assert (out / "report.html").is_file() and (out / "samples_none.png").is_file()
    for g in GUARDS:
        assert list((out / "runs" / g).rglob("events.out.tfevents.*"))


def test_second_run_reuses_the_cache_and_keeps_the_old_results(quick_demo):
    out, _, root = quick_demo
    base_dirs = sorted(p.name for p in (root / "cache").glob("base-*"))
    run_demo(CONFIG, out, quick=True, cache_dir=root / "cache")
    assert sorted(p.name for p in (root / "cache").glob("base-*")) == base_dirs
    moved = [p for p in out.parent.glob("demo_out.*") if p.is_dir()]
    assert moved and (moved[0] / "results.json").is_file()


def test_targets_are_computed_from_the_numbers():
    run = dict(dup_memorized_frac=0.6, heldout_loss=1.0, adherence=0.5, step_time_ratio=1.0)
    results = {"runs": {"none": run, "penalty": dict(run, dup_memorized_frac=0.1, heldout_loss=1.06)},
               "detection_none": {"norm": 0.97, "align": 0.3, "score": 0.9}, "wall_s": 600}
    got = {t["target"]: t["pass"] for t in targets(results)}
    assert got["none memorizes: dup copy rate >= 0.50"] is True
    assert got["detection AUC dup-vs-heldout, best of norm / score (paper weights) >= 0.95"] is True
    assert got["penalty copy rate <= 1/5 of none's"] is True  # 0.1 <= 0.12
    assert got["penalty held-out loss <= 1.05x none's"] is False


def test_unknown_section_is_named(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text("data: {}\nguardz: {}\n")
    with pytest.raises(ValueError, match="guardz"):
        load_settings(bad)
