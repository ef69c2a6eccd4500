"""Smoke test of scripts/bench_train.py: one repetition, one penalty cycle, both training modes."""

from __future__ import annotations

import math
from pathlib import Path

from memreg.testing import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def test_bench_train_reports_both_modes(tiny_sd_eps, capsys):
    bench = load_script(SCRIPT)
    med = bench.main(["--reps", "1", "--cycles", "1", "--modes", "lora", "full", "--model", str(tiny_sd_eps)])
    out = capsys.readouterr().out
    assert set(med) == {"lora", "full"}
    for mode, block in med.items():
        assert list(block) == ["none", "penalty defaults", "penalty every batch", "agc"]
        for name in block:
            step, peak = bench.ratios(block, name)
            assert math.isfinite(step) and step > 0, (mode, name, step)
            assert math.isfinite(peak) and peak > 0, (mode, name, peak)
        # the defaults probe on one step of the cycle, every batch on all of them
        assert math.isfinite(block["penalty defaults"]["active"])
        assert math.isnan(block["penalty every batch"]["inactive"])
        assert f"targets at the defaults ({mode}): step time" in out
        assert f"penalty every batch ({mode}): step time" in out
    # full fine-tuning keeps AdamW state for the whole UNet: more memory than LoRA's adapters
    assert med["full"]["none"]["heap"] > med["lora"]["none"]["heap"]


def test_step_time_is_weighted_to_the_configs_own_cadence():
    """Runs probe every MEASURE_EVERY steps; a config probing every n steps costs (active + (n-1) inactive) / n."""
    from types import SimpleNamespace

    bench = load_script(SCRIPT)
    t = bench.tags
    logs = [{"step": 1, t.PERF_STEP_TIME: 9.0, t.PERF_ACTIVATION_MB: 1.0, t.GUARD_PENALTY: 0.0}]   # warm-up: dropped
    for step, secs in ((2, 1.0), (3, 3.0), (4, 1.0), (5, 3.0)):
        lg = {"step": step, t.PERF_STEP_TIME: secs, t.PERF_ACTIVATION_MB: 1.0}
        if step % 2 == 1:
            lg[t.GUARD_PENALTY] = 0.0
        logs.append(lg)
    res = SimpleNamespace(logs=logs)
    assert bench.summarize(res, 5.0)["step"] == 2.0                       # no cadence: the plain mean
    assert bench.summarize(res, 5.0, every=4)["step"] == (3.0 + 3 * 1.0) / 4
    assert bench.summarize(res, 5.0, every=1)["step"] == 3.0
    # the defaults at batch 2 (2 probes x (u, c) = 4 samples, share 1/16): every 32 steps; every batch: 1
    assert bench.cadence(bench.penalty_defaults(), 2) == 32
    assert bench.cadence({"guard.type": "penalty", "guard.every_n_steps": 1}, 2) == 1
    assert bench.cadence({"guard.type": "agc"}, 2) is None
