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
