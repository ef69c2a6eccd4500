"""Smoke test of scripts/bench_attack.py: one repetition of every attack on the tiny pipeline."""

from __future__ import annotations

from pathlib import Path

from memreg.testing import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_attack.py"


def test_bench_attack_reports_every_attack(tiny_sd_eps, capsys):
    bench = load_script(SCRIPT)
    res = bench.main(["--reps", "1", "--steps", "2", "--draws", "1", "--perturbed", "1", "--noise-seeds", "2",
                      "--num-inference-steps", "2", "--model", str(tiny_sd_eps)])
    assert res == 0
    out = capsys.readouterr().out
    for attack in ("prompts", "perturbed", "embedding", "noise", "all"):
        assert any(line.startswith(attack) and "x" in line for line in out.splitlines()), attack
    assert "one plain generation" in out
