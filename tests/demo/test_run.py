"""memreg/demo/run.py: a toy-size smoke run of the whole demo produces every result field; targets by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from memreg.demo.run import (dominates, final_detection, load_settings, plain_run_of, ratio, run_demo, run_overrides,
                             targets, world_settings)
from memreg.testing import load_script

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
RUN_FIELDS = {"copy_exact", "copy_paraphrase", "copy_paraphrase_by_variant", "copy_exact_by_caption",
              "copy_paraphrase_by_caption",
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
    base = saved["runs"]["none"]["base_adherence"]     # the world check: the base on the held-out captions
    assert 0.0 <= base["adherence"] <= 1.0 and base["n"] == 2 * settings["final"]["heldout_captions"]
    assert saved["web"]["runs"]["none"]["base_adherence"] == base   # same base, held-out set and seeds
    assert set(saved["mitigation_none"]) == {"none", "wen", "score"}
    for mode, m in saved["mitigation_none"].items():
        assert {"tau", "copy_exact", "dup_flagged", "heldout_flagged", "adherence", "time_x"} <= set(m)
        assert (m["tau"] is None) == (mode == "none") and 0.0 <= m["heldout_flagged"] <= 1.0
    assert [t["target"] for t in saved["targets"]] == [t["target"] for t in results["targets"]]
    base_unet = json.loads((Path(saved["base_model"]) / "unet" / "config.json").read_text())
    assert base_unet["sample_size"] == settings["data"]["resolution"] // 2    # base.vae_downsample: true
    assert all(isinstance(t["pass"], bool) for t in saved["targets"])
    assert (out / "report.html").is_file() and (out / "samples_none.png").is_file()
    assert (out / "tradeoff.png").is_file() and "Copy rate vs held-out loss" in (out / "report.html").read_text()
    penalty_weights = {n: r["weight"] for n, r in saved["runs"].items() if r["guard"] == "anisotropy_gate"}
    assert set(penalty_weights) == {"penalty", "lora_penalty"}
    assert set(penalty_weights.values()) == {0.0}                   # the guard's default: the gate, no penalty
    for name in saved["runs"]:
        assert list((out / "runs" / name).rglob("events.out.tfevents.*"))
    web = saved["web"]          # the web world's quick runs (configs/demo.yaml quick.web)
    assert list(web["runs"]) == ["none", "penalty_augment"]
    for run in web["runs"].values():
        assert RUN_FIELDS <= set(run) and set(run["copy_paraphrase_by_variant"]) == {"unseen_0"}
        assert "attack" not in run
    assert web["runs"]["penalty_augment"]["step_time_ratio"] > 0 and (out / "web" / "tradeoff.png").is_file()
    assert [t for t in saved["targets"] if t["target"].startswith("web: penalty_augment copy rate")]


def test_second_run_reuses_the_cache_and_keeps_the_old_results(quick_demo):
    out, _, root = quick_demo
    base_dirs = sorted(p.name for p in (root / "cache").glob("base-*"))
    run_demo(CONFIG, out, quick=True, cache_dir=root / "cache")
    assert sorted(p.name for p in (root / "cache").glob("base-*")) == base_dirs
    moved = [p for p in out.parent.glob("demo_out.*") if p.is_dir()]
    assert moved and (moved[0] / "results.json").is_file()


def _run(copy, para, loss, adh, step=1.0, mode="full", guard="none", weight=None):
    return {"copy_exact": {"rate": copy}, "copy_paraphrase": {"rate": para}, "heldout_loss": loss, "adherence": adh,
            "step_time_ratio": step, "mode": mode, "guard": guard, "weight": weight}


def _guarded(*args, **kw):
    return _run(*args, guard="anisotropy_gate", weight=0.0, **kw)


def test_targets_are_computed_from_the_numbers():
    runs = {"none": dict(_run(0.6, 0.5, 1.0, 0.7), base_adherence={"adherence": 0.82, "n": 256}),
            "penalty": _guarded(0.1, 0.2, 1.06, 0.9, 1.2),
            "agc": _run(0.1, 0.1, 1.0, 0.9, guard="agc"), "lora_none": _run(0.2, 0.1, 1.0, 0.9, mode="lora"),
            "penalty_w0.3": _run(0.0, 0.0, 1.0, 0.9, guard="anisotropy_gate", weight=0.3)}
    results = {"runs": runs, "detection_none": {"norm": 0.97, "align": 0.3, "score": 0.96}, "wall_s": 1600}
    got = {t["target"]: t["pass"] for t in targets(results)}
    assert got["none memorizes: copy rate (exact) >= 0.5"] is True
    assert got["lora_none memorizes: copy rate (exact) >= 0.3"] is False
    assert got["detection at the end of none, paper's SD1 score (g1=1, g2=2), AUC memorized vs held-out >= 0.95"] is True
    assert got["the base follows held-out captions: adherence >= 0.8"] is True   # the base's 0.82, not none's 0.7
    assert got["penalty copy rate (exact) <= 1/5 of none's"] is True          # 0.1 <= 0.12
    assert got["penalty copy rate (paraphrased) <= 1/5 of none's"] is False   # 0.2 > 0.1
    assert got["penalty held-out loss <= 1.05x none's"] is False
    assert got["penalty step time <= 1.3x none's"] is True
    # agc: same copy rate, lower loss, same adherence -> it dominates the penalty
    assert got["agc does not dominate penalty (copy, loss, adherence; 1 = dominates)"] is False
    assert got["make demo wall time <= 25 min"] is False                      # 26.7 min
    assert not [t for t in got if t.startswith("penalty_w0.3")]              # a weight > 0 is not the default guard
    assert not [t for t in got if t.startswith("web: ")]                     # no web world in these results


def test_web_targets_use_their_own_plain_runs_and_labels():
    web = {"none": _run(0.5, 0.1, 1.0, 0.9), "penalty": _guarded(0.05, 0.0, 1.0, 0.9),
           "none_augment": _run(0.4, 0.2, 1.0, 0.9), "penalty_augment": _guarded(0.1, 0.01, 1.0, 0.9),
           "lora_none": _run(0.3, 0.1, 1.0, 0.9, mode="lora"), "lora_penalty": _guarded(0.1, 0.0, 1.0, 0.9, mode="lora")}
    results = {"runs": {}, "detection_none": {}, "wall_s": 1,
               "web": {"runs": web, "detection_none": {"score": 0.97}}}
    got = {t["target"]: (t["value"], t["pass"]) for t in targets(results)}
    assert got["web: none memorizes: copy rate (training wordings) >= 0.3"] == (0.5, True)
    assert got["web: lora_none memorizes: copy rate (training wordings) >= 0.2"] == (0.3, True)
    assert got["web: detection at the end of none, paper's SD1 score (g1=1, g2=2), AUC memorized vs held-out >= 0.95"][1]
    value, ok = got["web: the base follows held-out captions: adherence >= 0.8"]   # not measured: a MISS
    assert np.isnan(value) and not ok
    # penalty_augment against none_augment: 0.1 / 0.4 = 0.25 > 0.2; unseen 0.01 / 0.2 = 0.05
    assert got["web: penalty_augment copy rate (training wordings) <= 1/5 of none_augment's"] == (0.25, False)
    assert got["web: penalty_augment copy rate (unseen wordings) <= 1/5 of none_augment's"] == (pytest.approx(0.05), True)
    assert got["web: penalty copy rate (training wordings) <= 1/5 of none's"] == (pytest.approx(0.1), True)
    assert got["web: lora_penalty copy rate (training wordings) <= 1/5 of lora_none's"] == (pytest.approx(1 / 3), False)
    assert not [t for t in got if not t.startswith("web: ") and "wall time" not in t]


def test_plain_run_by_name():
    runs = {"none": _run(0, 0, 1, 1), "none_augment": _run(0, 0, 1, 1), "penalty_augment": _guarded(0, 0, 1, 1),
            "penalty_other": _guarded(0, 0, 1, 1), "lora_none": _run(0, 0, 1, 1, mode="lora"),
            "lora_penalty": _guarded(0, 0, 1, 1, mode="lora"), "wen_filter": _run(0, 0, 1, 1)}
    assert {n: plain_run_of(runs, n) for n in runs} == {
        "none": "none", "none_augment": "none_augment", "penalty_augment": "none_augment",
        "penalty_other": "none", "lora_none": "lora_none", "lora_penalty": "lora_none", "wen_filter": "none"}


def test_web_world_settings_merge_over_the_first_world():
    settings = load_settings(CONFIG)
    web = world_settings(settings, "web")
    assert web["data"]["seed"] == settings["data"]["seed"] and web["data"]["web"]["train_wordings"] == 4
    assert web["finetune"]["caption_column"] == "captions" and web["finetune"]["max_train_steps"] == 600   # inherited
    assert "none" in web["runs"] and "penalty_augment" in web["runs"]
    assert web["attack"]["runs"] == [] and web["mitigation"] is None and "web" not in web
    assert world_settings(settings, "studio") is settings


def test_unknown_web_section_is_named(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text("data: {}\nweb: {attack: {}}\n")
    with pytest.raises(ValueError, match="unknown web: section"):
        load_settings(bad)


def test_a_ratio_of_zeros_is_one_verdict_everywhere():
    assert math.isnan(ratio(0.0, 0.0)) and ratio(0.0, 2.0) == 0.0
    runs = {"none": _run(0.0, 0.0, 0.0, 0.0), "penalty": _guarded(0.0, 0.0, 0.0, 0.0)}
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


@pytest.mark.parametrize("section", ["final", "mitigation", "attack"])
def test_an_empty_eval_section_is_named(tmp_path, section):
    bad = tmp_path / "demo.yaml"
    bad.write_text(f"data: {{}}\n{section}:\n")   # YAML null: a one-line error, not a TypeError
    with pytest.raises(ValueError, match=f"{section}: must be a mapping"):
        load_settings(bad)


def test_base_keys_are_checked_before_anything_is_built(tmp_path):
    text = CONFIG.read_text()
    assert text.count("\n  vae_downsample: true") == 1
    bad = tmp_path / "demo.yaml"
    bad.write_text(text.replace("\n  vae_downsample: true", "\n  vae_stpes: 10"))   # a typo for a required key
    with pytest.raises(ValueError, match=r"base: missing \['vae_downsample'\], unknown \['vae_stpes'\]"):
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


def test_world_check_uses_the_memorized_wordings_not_the_index_groups(tmp_path):
    mem = tmp_path / "memorization"
    mem.mkdir()
    row = lambda v: {"norm": v, "align": -v, "score": v}  # noqa: E731
    groups = {"memorized": [row(2.0), row(3.0)], "heldout": [row(1.0), row(2.5)], "duplicated": [row(0.5)]}
    scalars = {"eval/auc/duplicated_vs_heldout/norm": 0.25}
    for step in (0, 10):
        (mem / f"eval_step{step:08d}.json").write_text(json.dumps({"groups": groups, "scalars": scalars}))
    d = final_detection(tmp_path)
    # memorized vs held-out pairs: 2>1, 2<2.5, 3>1, 3>2.5 -> 3/4; align is the negative: 1/4
    assert d["positives"] == "memorized" and d["norm"] == 0.75 and d["score"] == 0.75 and d["align"] == 0.25
    assert d["duplicated_auc"]["norm"] == scalars["eval/auc/duplicated_vs_heldout/norm"]


def _curve_run(copy, para, loss, adh, mode="full", weight=0.0, hi=None):
    r = _run(copy, para, loss, adh, mode=mode, guard="anisotropy_gate", weight=weight)
    for key, rate in (("copy_exact", copy), ("copy_paraphrase", para)):
        r[key]["ci95"] = [0.0, rate + 0.05 if hi is None else hi]
    return r


def test_study_runs_are_named_by_value_and_compared_with_their_plain_run():
    from memreg.demo.run import load_settings, study_settings

    settings = load_settings(CONFIG)
    s = study_settings(settings, "penalty_curve")
    weights = settings["studies"]["penalty_curve"]["values"]
    assert [n for n in s["runs"] if n.startswith("lora_penalty@")] == [f"lora_penalty@{w:g}" for w in weights]
    assert s["runs"][f"penalty@{weights[-1]:g}"]["guard.weight"] == weights[-1]
    assert "wen_filter" not in s["runs"] and s["attack"]["runs"] == [] and s["mitigation"] is None
    web = world_settings(s, "web")["runs"]
    runs = {n: {"mode": (r or {}).get("mode", "full")} for n, r in web.items()}
    assert plain_run_of(runs, "penalty_augment@0.5") == "none_augment"
    assert plain_run_of(runs, "lora_penalty@1") == "lora_none" and plain_run_of(runs, "penalty@1") == "none"
    term = study_settings(settings, "term")["runs"]
    assert term["penalty@align"]["guard.term"] == "align" and "penalty@combined" in term
    assert list(term) == ["none", "penalty", "penalty@align", "penalty@combined"]   # runs: [penalty] and its plain run
    with pytest.raises(ValueError, match="--study nope"):
        study_settings(settings, "nope")


def test_curve_targets_by_hand():
    from memreg.demo.run import curve_targets

    runs = {"none": _run(0.5, 0.3, 1.0, 0.9), "penalty": _curve_run(0.10, 0.05, 1.02, 0.90, hi=0.12),
            "penalty@0.5": _curve_run(0.11, 0.00, 1.12, 0.80, weight=0.5, hi=0.2),
            "penalty@1": _curve_run(0.25, 0.00, 1.05, 0.95, weight=1.0)}
    got = {t: ok for t, _, ok in curve_targets(runs, "studio")}
    names = [t["target"] for t in targets({"runs": runs, "detection_none": {}, "wall_s": 60, "study": "penalty_curve",
                                           "settings": {"studies": {"penalty_curve": {"key": "guard.weight"}}}})]
    assert "penalty@1 (weight 1) adherence >= 0.90x none's" in names and not any("wall time" in n for n in names)
    assert got["penalty (weight 0) held-out loss <= 1.10x none's"] is True
    assert got["penalty@0.5 (weight 0.5) held-out loss <= 1.10x none's"] is False     # 1.12
    assert got["penalty@0.5 (weight 0.5) adherence >= 0.90x none's"] is False         # 0.80 / 0.9 = 0.89
    assert got["penalty@1 (weight 1) adherence >= 0.90x none's"] is True
    assert got["penalty@0.5 copy rate (exact) <= upper 95% bound of penalty's (0.12)"] is True    # 0.11
    assert got["penalty@1 copy rate (exact) <= upper 95% bound of penalty@0.5's (0.20)"] is False  # 0.25


def test_a_study_without_the_full_plain_run_checks_no_detection_and_no_adherence_floor():
    runs = {"lora_none": _run(0.6, 0.3, 1.0, 0.9, mode="lora"),
            "lora_penalty": _curve_run(0.0, 0.0, 0.96, 0.92, mode="lora")}
    names = [t["target"] for t in targets({"runs": runs, "detection_none": {}, "wall_s": 60, "study": "penalty_curve",
                                           "settings": {"studies": {"penalty_curve": {"key": "guard.weight"}}}})]
    assert "lora_none memorizes: copy rate (exact) >= 0.3" in names
    assert not any("detection" in n or "follows held-out" in n for n in names)


def test_bench_mitigation_measures_descents_on_the_demo_s_model(quick_demo, tmp_path, capsys):
    """scripts/bench_mitigation.py on the quick demo's none: a 0-step descent flags what score flags
    but moves nothing, so it copies exactly as often as unmitigated generation in the same run."""
    out, results, _ = quick_demo
    bench = load_script(Path(__file__).resolve().parents[2] / "scripts" / "bench_mitigation.py")
    report = tmp_path / "mit.json"
    assert bench.main(["--demo-out", str(out), "--descent", "0:0.1", "1:0.05:1", "--json", str(report)]) == 0
    mit = json.loads(report.read_text())
    assert list(mit) == ["none", "score 0:0.1", "score 1:0.05:1"] and mit["none"]["descent"] is None
    assert mit["score 0:0.1"]["descent"] == {"max_steps": 0, "lr": 0.1, "stop_streak": 2}   # score's streak
    assert mit["score 1:0.05:1"]["descent"] == {"max_steps": 1, "lr": 0.05, "stop_streak": 1}
    assert mit["score 0:0.1"]["copy_exact"] == mit["none"]["copy_exact"]
    assert mit["score 0:0.1"]["tau"] == mit["score 1:0.05:1"]["tau"]        # one calibration rule for both
    assert "score 1:0.05:1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        bench.main(["--demo-out", str(out), "--descent", "20"])
    assert bad.value.code == 2 and "MAX_STEPS:LR[:STREAK]" in capsys.readouterr().err
    assert bench.main(["--demo-out", str(tmp_path), "--descent", "1:0.1"]) == 2
    assert "no results.json" in capsys.readouterr().err
