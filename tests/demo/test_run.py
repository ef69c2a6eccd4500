"""memreg/demo/run.py: a toy-size smoke run of the whole demo produces every result field; targets by hand."""

import json
import math
from pathlib import Path

import pytest

from memreg.demo.run import dominates, load_settings, ratio, run_demo, run_overrides, targets

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
RUN_FIELDS = {"copy_exact", "copy_paraphrase", "copy_paraphrase_by_variant", "copy_exact_by_caption",
              "dup_own_similarity_mean", "heldout_copy", "heldout_photo_similarity_mean",
              "heldout_any_train_over_threshold", "heldout_loss", "adherence", "copy_threshold", "mode", "guard",
              "train_s", "step_time_s", "step_time_ratio", "detection", "weight", "cond_ratio"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = root / "demo_out"
    results = run_demo(CONFIG, out, quick=True, cache_dir=root / "cache")
    return out, results, root


def test_results_have_every_field(quick_demo):
    out, results, _ = quick_demo
    saved = json.loads((out / "results.json").read_text())
    settings = load_settings(CONFIG, quick=True)
    assert list(saved["runs"]) == list(settings["runs"])
    # the default runs: none, the guard and the strongest baseline (configs/demo.yaml), canonical names
    assert {r["guard"] for r in saved["runs"].values()} == {"none", "anisotropy_gate", "wen_filter"}
    assert set(saved["runs"]["none"]["attack"]["rates"]) == {"trained", "control"}   # quick attack.runs
    assert "attack" in saved["runs"]["lora_penalty"] and "attack" not in saved["runs"]["penalty"]
    assert {r["mode"] for r in saved["runs"].values()} == {"full", "lora"}
    for run in saved["runs"].values():
        assert RUN_FIELDS <= set(run)
        for key in ("copy_exact", "copy_paraphrase", "heldout_copy"):
            r = run[key]
            assert 0.0 <= r["ci95"][0] <= r["rate"] <= r["ci95"][1] <= 1.0 and r["n"] > 0
        assert set(run["copy_paraphrase_by_variant"]) == {"drop", "reorder", "synonym"}
        assert 0.0 <= run["adherence"] <= 1.0 and run["heldout_loss"] > 0
        assert 0.0 <= run["heldout_any_train_over_threshold"] <= 1.0    # quick turns heldout_vs_train on
    assert {"norm", "align", "score", "groups_start", "groups_end"} <= set(saved["detection_none"])
    assert set(saved["mitigation_none"]) == {"none", "wen", "score"}
    for mode, m in saved["mitigation_none"].items():
        assert {"tau", "copy_exact", "dup_flagged", "heldout_flagged", "adherence", "time_x"} <= set(m)
        assert (m["tau"] is None) == (mode == "none") and 0.0 <= m["heldout_flagged"] <= 1.0
    assert [t["target"] for t in saved["targets"]] == [t["target"] for t in results["targets"]]
    assert all(isinstance(t["pass"], bool) for t in saved["targets"])
    assert (out / "report.html").is_file() and (out / "samples_none.png").is_file()
    assert (out / "tradeoff.png").is_file() and "Copy rate vs held-out loss" in (out / "report.html").read_text()
    penalty_weights = {n: r["weight"] for n, r in saved["runs"].items() if r["guard"] == "anisotropy_gate"}
    assert set(penalty_weights) == {"penalty", "lora_penalty"}
    assert set(penalty_weights.values()) == {0.0}                   # the guard's default: the gate, no penalty
    for name in saved["runs"]:
        assert list((out / "runs" / name).rglob("events.out.tfevents.*"))


def test_second_run_reuses_the_cache_and_keeps_the_old_results(quick_demo):
    out, _, root = quick_demo
    base_dirs = sorted(p.name for p in (root / "cache").glob("base-*"))
    run_demo(CONFIG, out, quick=True, cache_dir=root / "cache")
    assert sorted(p.name for p in (root / "cache").glob("base-*")) == base_dirs
    moved = [p for p in out.parent.glob("demo_out.*") if p.is_dir()]
    assert moved and (moved[0] / "results.json").is_file()


def _run(copy, para, loss, adh, step=1.0, mode="full"):
    return {"copy_exact": {"rate": copy}, "copy_paraphrase": {"rate": para}, "heldout_loss": loss, "adherence": adh,
            "step_time_ratio": step, "mode": mode}


def test_targets_are_computed_from_the_numbers():
    runs = {"none": _run(0.6, 0.5, 1.0, 0.9), "penalty": _run(0.1, 0.2, 1.06, 0.9, 1.2),
            "agc": _run(0.1, 0.1, 1.0, 0.9), "lora_none": _run(0.2, 0.1, 1.0, 0.9, mode="lora")}
    results = {"runs": runs, "detection_none": {"norm": 0.97, "align": 0.3, "score": 0.96}, "wall_s": 1600}
    got = {t["target"]: t["pass"] for t in targets(results)}
    assert got["none memorizes: exact-caption copy rate >= 0.5"] is True
    assert got["lora_none memorizes: exact-caption copy rate >= 0.3"] is False
    assert got["detection at the end of none, paper's SD1 score (g1=1, g2=2), AUC dup vs held-out >= 0.95"] is True
    assert got["none follows held-out captions: adherence >= 0.8"] is True
    assert got["penalty copy rate (exact) <= 1/5 of none's"] is True          # 0.1 <= 0.12
    assert got["penalty copy rate (paraphrased) <= 1/5 of none's"] is False   # 0.2 > 0.1
    assert got["penalty held-out loss <= 1.05x none's"] is False
    assert got["penalty step time <= 1.3x none's"] is True
    # agc: same copy rate, lower loss, same adherence -> it dominates the penalty
    assert got["agc does not dominate penalty (copy, loss, adherence; 1 = dominates)"] is False
    assert got["make demo wall time <= 25 min"] is False                      # 26.7 min


def test_a_ratio_of_zeros_is_one_verdict_everywhere():
    assert math.isnan(ratio(0.0, 0.0)) and ratio(0.0, 2.0) == 0.0
    runs = {"none": _run(0.0, 0.0, 0.0, 0.0), "penalty": _run(0.0, 0.0, 0.0, 0.0)}
    got = {t["target"]: t["pass"] for t in targets({"runs": runs, "detection_none": {}, "wall_s": 1})}
    ratio_checks = [v for k, v in got.items() if k.startswith("penalty") and "step time" not in k]
    assert ratio_checks == [False] * 4


def test_dominance_by_hand():
    assert dominates(_run(0.1, 0, 1.0, 0.9), _run(0.2, 0, 1.0, 0.9))
    assert not dominates(_run(0.1, 0, 1.1, 0.9), _run(0.2, 0, 1.0, 0.9))   # a trade-off, not dominance
    assert not dominates(_run(0.1, 0, 1.0, 0.9), _run(0.1, 0, 1.0, 0.9))   # equal is not better


def test_run_guard_defaults_to_its_name_and_unknown_is_named():
    settings = {"finetune": {"mode": "full"}, "runs": {"agc": {}, "lora_x": {"mode": "lora", "guard.type": "penalty"},
                                                       "bad": {"guard.type": "nope"}}}
    assert run_overrides(settings, "agc")["guard.type"] == "agc"
    assert run_overrides(settings, "lora_x") == {"mode": "lora", "guard.type": "penalty"}
    with pytest.raises(ValueError, match="'nope'"):
        run_overrides(settings, "bad")


def test_unknown_section_is_named(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text("data: {}\nguardz: {}\n")
    with pytest.raises(ValueError, match="guardz"):
        load_settings(bad)


def test_a_section_given_twice_is_named(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text("data: {seed: 0}\nmitigation: {images_per_caption: 8}\nmitigation: {images_per_caption: 4}\n")
    with pytest.raises(Exception, match="duplicate key 'mitigation'"):
        load_settings(bad)


@pytest.mark.parametrize("workers", [0, "2", 1.5, True])
def test_workers_must_be_a_positive_integer(tmp_path, workers):
    bad = tmp_path / "demo.yaml"
    bad.write_text(f"workers: {workers!r}\ndata: {{}}\n" if not isinstance(workers, str) else f"workers: '{workers}'\n")
    with pytest.raises(ValueError, match="workers must be an integer"):
        load_settings(bad)
