"""Smoke test of scripts/bench_demo_unet.py: shapes parsed by hand, one tiny repetition timed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from memreg.testing import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_demo_unet.py"


@pytest.fixture
def keep_threads():
    """The script sets torch's thread count (--threads); later tests run with the session's own."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_shapes_are_parsed_and_bad_ones_named(keep_threads):
    bench = load_script(SCRIPT)
    assert bench.parse_shape("32,64,64:2") == {"unet_channels": (32, 64, 64), "attention_levels": 2,
                                                "attention_head_dim": 8, "sample_size": 8}
    assert bench.parse_shape("32,64:1:32")["attention_head_dim"] == 32
    assert bench.parse_shape("32,64,64:2@16")["sample_size"] == 16
    for bad in ("32,64", "32,64:3", "a,b:1", "32,64,64:2@6", "32,64:1@x"):   # 6 does not halve twice
        with pytest.raises(ValueError, match=f"--shapes '{bad}'"):
            bench.parse_shape(bad)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--shapes", "32,64"])
    assert exit_.value.code == 2


def test_every_shape_gets_a_train_and_a_sample_time(capsys, keep_threads):
    bench = load_script(SCRIPT)
    out = bench.main(["--shapes", "32,64:1", "32,64,64:1@16", "--batches", "2", "--reps", "1", "--steps", "1"])
    assert list(out) == ["32,64:1", "32,64,64:1@16", "parts"]
    for name in ("32,64:1", "32,64,64:1@16"):
        assert list(out[name]) == ["train b2", f"sample b{bench.SAMPLE_BATCH}"]
    assert list(out["parts"]) == ["per_tensor", "fused", "adapters", "merged"]
    assert all(math.isfinite(v) and v > 0 for m in out.values() for v in m.values())
    printed = capsys.readouterr().out
    assert "speed-up against 32,64:1" in printed and "AdamW per tensor" in printed and "LoRA adapters" in printed
