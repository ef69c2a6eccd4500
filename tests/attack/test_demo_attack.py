"""memreg/demo/attack.py: the demo's attack targets by hand; the control never holds a trained photo."""

import pytest

from memreg.attack.outputs import wilson
from memreg.demo.attack import attack_targets_of, control_photos


def _rep(k, n, ck, cn):
    return {"settings": {"attacks": ["prompts", "perturbed", "embedding"]},
            "rates": {"trained": {"embedding": wilson(k, n)}, "control": {"embedding": wilson(ck, cn)}}}


def test_targets_by_hand():
    runs = {"none": {"attack": _rep(7, 8, 0, 8)}, "penalty": {"attack": _rep(1, 8, 0, 8)},
            "lora_penalty": {"attack": _rep(2, 8, 1, 8)}, "agc": {}}
    got = {t: (v, ok) for t, v, ok in attack_targets_of(runs)}
    assert got["attack: penalty white-box extraction rate <= 1/5 of none's"] == (pytest.approx(1 / 7), True)
    assert got["attack: lora_penalty white-box extraction rate <= 1/5 of none's"] == (pytest.approx(2 / 7), False)
    inside = [k for k in got if k.startswith("attack: penalty white-box extraction rate inside")]
    assert len(inside) == 1 and got[inside[0]] == (0.125, True)        # 1/8 <= upper bound 0.32 of 0/8
    assert got["attack: control (false-positive) rate <= 5% on every attacked model"] == (0.125, False)
    assert attack_targets_of({"none": {"attack": _rep(0, 8, 0, 8)}, "penalty": {"attack": _rep(0, 8, 0, 8)}})[0][2] \
        is False                                                        # 0/0: nothing to compare, MISS


def test_control_photos_are_never_the_trained_ones():
    memorized = [{"source": "coffee", "caption": "a red circle and a white cross"},
                 {"source": "moon", "caption": "a green box and a black triangle"}]
    ctl = control_photos(memorized, 6, 16, seed=0)
    assert len(ctl) == 6 and not {"coffee", "moon"} & {t.file_name for t in ctl}
    assert all(t.kind == "control" and t.image.size == (16, 16) and len(t.wordings) == 1 for t in ctl)
    assert len({t.wordings[0] for t in ctl}) == 6
