"""memreg/demo/mitigation.py: the mitigation targets from hand-made numbers (the run itself is in test_run)."""

import math

from memreg.demo.mitigation import format_mitigation, mitigation_targets


def _mode(copy, held_flag, adh, t=1.0):
    return {"tau": 1.0, "copy_exact": {"rate": copy, "ci95": [0.0, 1.0]}, "dup_flagged": 1.0,
            "heldout_flagged": held_flag, "adherence": adh, "time_x": t}


def test_targets_by_hand():
    mit = {"none": _mode(0.5, 0.0, 0.9), "wen": _mode(0.2, 0.1, 0.85, 3.0), "score": _mode(0.1, 0.04, 0.885, 2.0)}
    got = {t: (v, ok) for t, v, ok in mitigation_targets(mit)}
    assert got["mitigation score: duplicated copy rate <= 1/5 of unmitigated"] == (0.2, True)
    assert got["mitigation score: held-out captions flagged <= 5%"] == (0.04, True)
    v, ok = got["mitigation score: held-out adherence >= 0.98x unmitigated"]
    assert math.isclose(v, 0.885 / 0.9) and ok                      # 0.9833
    mit["score"]["adherence"] = 0.88                                 # 0.9778 < 0.98
    assert not [ok for t, _, ok in mitigation_targets(mit) if "adherence" in t][0]


def test_nothing_to_mitigate_misses():
    mit = {"none": _mode(0.0, 0.0, 0.9), "score": _mode(0.0, 0.0, 0.9)}
    (t, v, ok), *_ = mitigation_targets(mit)
    assert math.isnan(v) and ok is False


def test_table_has_a_row_per_mode():
    mit = {"none": _mode(0.5, 0.0, 0.9), "wen": _mode(0.2, 0.1, 0.85, 3.0), "score": _mode(0.1, 0.04, 0.885, 2.0)}
    lines = format_mitigation(mit).splitlines()
    assert [x.split()[0] for x in lines[1:]] == ["none", "wen", "score"] and "3.00" in lines[2]
