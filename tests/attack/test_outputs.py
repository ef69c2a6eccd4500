"""memreg/attack/outputs.py: Wilson intervals and cumulative rates by hand; the page escapes captions."""

import math

import pytest

from memreg.attack.outputs import build_report, extracted_by_level, rates, wilson, write_html

Z = 1.959963984540054


def test_wilson_by_hand():
    # k = 0, n = 10: [0, z^2 / (n + z^2)] = [0, 3.8415 / 13.8415]
    r = wilson(0, 10)
    assert r["rate"] == 0 and r["ci95"][0] == pytest.approx(0, abs=1e-12)
    assert r["ci95"][1] == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    # k = 5, n = 10: centre 0.5, half-width z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4 n^2))
    half = Z / (1 + Z * Z / 10) * math.sqrt(0.025 + Z * Z / 400)
    assert half == pytest.approx(0.26340, abs=1e-4)
    assert wilson(5, 10)["ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-9)
    assert math.isnan(wilson(0, 0)["rate"])


def _rec(kind, successes):
    return {"id": f"{kind}-0", "kind": kind, "attacks": {a: {"success": s, "seconds": 1.0} for a, s in successes.items()}}


def test_rates_are_cumulative():
    attacks = ["prompts", "perturbed", "embedding"]
    recs = [_rec("trained", {"prompts": True}),                                        # stopped early
            _rec("trained", {"prompts": False, "perturbed": False, "embedding": True}),
            _rec("trained", {"prompts": False, "perturbed": False, "embedding": False}),
            _rec("trained", {"prompts": False, "perturbed": True}),
            _rec("control", {"prompts": False, "perturbed": False, "embedding": False})]
    assert extracted_by_level(recs[1], attacks) == {"prompts": False, "perturbed": False, "embedding": True}
    r = rates(recs, attacks)
    assert [r["trained"][a]["k"] for a in attacks] == [1, 2, 3]
    assert r["trained"]["embedding"]["rate"] == 0.75 and r["trained"]["embedding"]["n"] == 4
    assert r["control"]["embedding"]["k"] == 0 and r["control"]["embedding"]["n"] == 1


def test_html_escapes_captions(tmp_path):
    rec = {"id": "trained-00000", "kind": "trained", "copies": 3, "wordings": ["<script>alert(1)</script> & co"],
           "best_similarity": 0.9, "extracted": True, "extracted_by": "prompts", "best": {"wording": "<b>x</b>"},
           "attacks": {"prompts": {"success": True, "seconds": 0.5}}}
    meta = {"model": "m<1>", "lora": None, "settings": {"attacks": ["prompts"]},
            "detector": {"name": "ssim", "threshold": 0.5}}
    write_html(tmp_path / "attack.html", build_report([rec], meta, complete=True))
    page = (tmp_path / "attack.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "<b>x</b>" not in page and "m&lt;1&gt;" in page
