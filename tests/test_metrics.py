"""memreg.metrics against hand-computed ROC examples (expected numbers worked out below by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from memreg.metrics import auroc, detection_metrics, fpr_key, roc_points, tpr_at_fpr, tpr_at_fpr_closest


def _split(pos, neg):
    return [1] * len(pos) + [0] * len(neg), list(pos) + list(neg)


def test_auc_single_tied_pair_is_half():
    labels, scores = _split([1.0], [1.0])
    assert auroc(labels, scores) == pytest.approx(0.5)


def test_auc_with_a_tie_between_positive_and_negative():
    # pos {2, 1}, neg {1, 0}: pairs (2>1)=1, (2>0)=1, (1=1)=1/2, (1>0)=1 -> 3.5 / 4
    labels, scores = _split([2.0, 1.0], [1.0, 0.0])
    assert auroc(labels, scores) == pytest.approx(0.875)


def test_small_curve_with_ties_both_conventions():
    # pos {3, 2, 1}, neg {2, 0}.
    # AUC pairs: (3,2)=1 (3,0)=1 (2,2)=1/2 (2,0)=1 (1,2)=0 (1,0)=1 -> 4.5 / 6 = 0.75.
    # ROC (threshold: FPR, TPR): inf:(0,0) 3:(0,1/3) 2:(1/2,2/3) 1:(1/2,1) 0:(1,1).
    labels, scores = _split([3.0, 2.0, 1.0], [2.0, 0.0])
    assert auroc(labels, scores) == pytest.approx(0.75)
    fpr, tpr, _ = roc_points(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    # FPR <= 0.4 allows only FPR 0 points: best TPR 1/3. FPR <= 0.5 reaches (1/2, 1).
    assert tpr_at_fpr(labels, scores, 0.0) == pytest.approx(1 / 3)
    assert tpr_at_fpr(labels, scores, 0.4) == pytest.approx(1 / 3)
    assert tpr_at_fpr(labels, scores, 0.5) == pytest.approx(1.0)
    # Closest to 0.4 is FPR 1/2 (distance 0.1); the first such point in curve order is (1/2, 2/3).
    assert tpr_at_fpr_closest(labels, scores, 0.4) == pytest.approx(2 / 3)
    # Closest to 0.1: FPR 0 (distance 0.1, beats 0.4); first such point is (0, 0).
    assert tpr_at_fpr_closest(labels, scores, 0.1) == pytest.approx(0.0)


def test_hundred_negatives_tpr_at_1_and_3_percent():
    # Negatives score 0..99. Positives: five tied at 200, then 98.5, 97.5, 50.5, 10.5, -1.
    neg = np.arange(100.0)
    pos = [200.0] * 5 + [98.5, 97.5, 50.5, 10.5, -1.0]
    labels, scores = _split(pos, neg)
    # Negatives below each positive: 100 (x5), 99, 98, 51, 11, 0 -> 759 of 10 * 100 pairs.
    assert auroc(labels, scores) == pytest.approx(0.759)
    # FPR <= 1%: at most one negative (99) above threshold -> threshold 98.5 keeps 6 positives.
    assert tpr_at_fpr(labels, scores, 0.01) == pytest.approx(0.6)
    # FPR <= 3%: negatives 97, 98, 99 -> threshold 97 keeps 5 + 98.5 + 97.5 = 7 positives.
    assert tpr_at_fpr(labels, scores, 0.03) == pytest.approx(0.7)
    # Paper convention. Corner points kept by roc_curve: (0,0) (0,.5) (.01,.5) (.01,.6) (.02,.6)
    # (.02,.7) (.49,.7) ... ; the collinear (.03,.7) is dropped.
    # 1%: first point with FPR .01 is (.01, .5) -> 0.5 (below the <= convention's 0.6).
    assert tpr_at_fpr_closest(labels, scores, 0.01) == pytest.approx(0.5)
    # 3%: nearest FPR is .02 (distance .01); first such point (.02, .6) -> 0.6.
    assert tpr_at_fpr_closest(labels, scores, 0.03) == pytest.approx(0.6)
    m = detection_metrics(labels, scores)
    assert m.auc == pytest.approx(0.759)
    assert m.tpr_at_fpr == pytest.approx({"1%": 0.6, "3%": 0.7})
    assert m.tpr_at_fpr_closest == pytest.approx({"1%": 0.5, "3%": 0.6})


def test_all_scores_tied():
    # One threshold: ROC (0,0) -> (1,1). AUC 1/2; no TPR is reachable at FPR < 1.
    labels, scores = _split([5.0, 5.0], [5.0, 5.0, 5.0])
    assert auroc(labels, scores) == pytest.approx(0.5)
    assert tpr_at_fpr(labels, scores, 0.03) == 0.0
    assert tpr_at_fpr(labels, scores, 1.0) == 1.0


def test_perfect_and_inverted_separation():
    labels, scores = _split([3.0, 4.0], [1.0, 2.0])
    assert auroc(labels, scores) == 1.0
    assert tpr_at_fpr(labels, scores, 0.0) == 1.0
    assert auroc(labels, [-s for s in scores]) == 0.0
    assert tpr_at_fpr(labels, [-s for s in scores], 0.4) == 0.0


def test_fpr_key():
    assert fpr_key(0.01) == "1%"
    assert fpr_key(0.03) == "3%"
    assert fpr_key(0.005) == "0.5%"


@pytest.mark.parametrize("labels,scores", [([1, 1], [0.1, 0.2]), ([1, 0], [0.1]), ([1, 0], [0.1, float("nan")]),
                                           ([1, 2], [0.1, 0.2])])
def test_bad_input_raises(labels, scores):
    with pytest.raises(ValueError):
        auroc(labels, scores)
