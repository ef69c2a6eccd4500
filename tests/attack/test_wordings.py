"""memreg/attack/wordings.py: each edit by hand, determinism, no training wording comes back."""

import numpy as np

from memreg.attack.wordings import perturb, perturbed_wordings


def test_each_edit():
    rng = np.random.default_rng(0)
    assert perturb("a red circle and a white cross", "reorder", rng) == "a white cross and a red circle"
    assert perturb("a red circle", "synonym", rng) in ("a crimson circle", "a red disc")
    dropped = perturb("a red circle", "drop", rng)
    assert dropped in ("red circle", "a circle", "a red")
    t = perturb("coffee", "typo", rng)
    assert t != "coffee" and (sorted(t) == sorted("coffee") or len(t) == len("coffee") - 1)
    assert perturb("a", "drop", rng) is None and perturb("xyz", "synonym", rng) is None


def test_wordings_are_deterministic_distinct_and_new():
    train = ["a red circle and a white cross", "a green box"]
    a = perturbed_wordings(train, 6, seed=3)
    assert a == perturbed_wordings(train, 6, seed=3)
    texts = [w for _, w in a]
    assert len(texts) == 6 and len(set(texts)) == 6 and not set(texts) & set(train)
    assert [k for k, _ in a[:4]] == ["drop", "reorder", "synonym", "typo"]
    assert perturbed_wordings([], 4) == []
