"""memreg.audit.merge and .captions: clustering, risk and caption keys against hand-made answers."""

from __future__ import annotations

import math

import numpy as np

from memreg.audit.captions import normalize_caption
from memreg.audit.merge import RowIndex, caption_groups, cluster_rows, rank_clusters, risk, score_quantile
from memreg.keys import text_key


def test_normalize_caption():
    assert normalize_caption("  A Photo of a CAT!! ") == "a photo of a cat"
    assert normalize_caption("ｆｕｌｌ-width_text") == "full width text"
    assert text_key("a") == text_key("a") != text_key("b")


def test_risk_and_quantile_by_hand():
    assert np.allclose(risk(np.array([1, 3]), np.array([0.0, 0.5])), [1.0, 2.0 * 1.5])
    q = score_quantile(np.array([1.0, 2.0, 3.0, np.nan]), np.array([2.5, 1.0, np.nan, 9.0]))
    assert np.allclose(q, [2 / 3, 0.0, 0.0, 1.0])


def index(sha, codes, scores, caps):
    n = len(sha)
    ok = np.array([s is not None for s in sha])
    return RowIndex(ok, np.array([s or 0 for s in sha], np.uint64), np.array(codes, np.uint8),
                    np.array(caps, np.int64), np.array(caps, np.int64), np.array(scores, float), int((~ok).sum()))


def test_clusters_join_exact_and_near_copies():
    z = [0] * 8
    near = [0b111] + [0] * 7            # 3 bits from z
    far = [0xFF] * 4 + [0] * 4           # 32 bits from z
    far2 = [0xFF] * 4 + [0b1] + [0] * 3  # 1 bit from far
    idx = index(sha=[11, 11, 12, None, 13, 14, 15],
                codes=[z, z, near, z, far, far2, [0x0F] * 8],
                scores=[1.0, 1.0, 3.0, np.nan, 0.5, 2.0, 0.1], caps=[5, 5, 6, 0, 7, 7, 8])
    labels, pairs, images = cluster_rows(idx, threshold=3)
    assert labels.tolist() == [0, 0, 0, -1, 4, 4, 6]
    assert pairs == 2 and images == 5
    t = rank_clusters(idx, labels, min_size=2)
    # 6 finite scores. Cluster 0: 3 rows, max 3.0, five scores below it -> q = 5/6.
    # Cluster 4: 2 rows, max 2.0, four below (1, 1, .5, .1) -> q = 4/6. Row 6 is a singleton.
    assert t.label.tolist() == [0, 4]
    assert t.size.tolist() == [3, 2] and t.images.tolist() == [2, 2]
    assert np.allclose(t.risk, [math.log2(4) * (1 + 5 / 6), math.log2(3) * (1 + 4 / 6)])
    g = caption_groups(idx)
    assert g["exact"] == {"distinct": 4, "repeated": 2, "rows_in_repeats": 4} and g["empty"] == 1


def test_near_threshold_is_inclusive():
    idx = index(sha=[1, 2], codes=[[0] * 8, [0b111] + [0] * 7], scores=[np.nan] * 2, caps=[1, 2])
    assert cluster_rows(idx, 3)[0].tolist() == [0, 0]
    assert cluster_rows(idx, 2)[0].tolist() == [0, 1]
