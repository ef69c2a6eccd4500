"""memreg/demo/tradeoff.py: Pareto fronts and penalty lines by hand, and the PNG it writes."""

import pytest

from memreg.demo.run import COPY_LABELS
from memreg.demo.tradeoff import pareto_front, penalty_line, plot_tradeoff

LABELS = COPY_LABELS["studio"]


def _rate(r: float, n: int = 16) -> dict:
    """A copy-rate dict as memreg.demo.evaluate.rate writes it (CI: a plausible band, not recomputed)."""
    if n == 0:
        return {"rate": float("nan"), "k": 0, "n": 0, "ci95": [float("nan"), float("nan")]}
    return {"rate": r, "k": round(r * n), "n": n, "ci95": [max(r - 0.2, 0.0), min(r + 0.2, 1.0)]}


def _run(loss, exact, para=None, mode="full", guard="none", n=16, **extra) -> dict:
    return dict(copy_exact=_rate(exact, n), copy_paraphrase=_rate(exact if para is None else para, n),
                heldout_loss=loss, adherence=0.9, guard=guard, mode=mode, **extra)


@pytest.fixture
def runs():
    # full runs, (loss, exact copy rate):
    #   a (1.0, 0.5)  nobody has loss <= 1.0 and copy <= 0.5 except itself         -> front
    #   b (1.2, 0.1)  only d ties it; nothing is strictly better anywhere          -> front
    #   d (1.2, 0.1)  tie with b: neither dominates the other                      -> front
    #   c (1.1, 0.5)  a: same copy, lower loss                                     -> dominated
    #   e (1.3, 0.3)  b: lower copy and lower loss                                 -> dominated
    #   f (0.9, nan)  no copy evaluations: not comparable                          -> off the front
    # lora runs: l1 (0.5, 0.0) would dominate every full run but is not compared with them;
    #   l2 (2.0, 0.9) is dominated by l1.
    return {
        "a": _run(1.0, 0.5, para=0.2),
        "b": _run(1.2, 0.1, para=0.4, guard="penalty", weight=0.3),
        "c": _run(1.1, 0.5, para=0.1, guard="wen_filter"),
        "d": _run(1.2, 0.1, para=0.4, guard="penalty", weight=0.03),
        "e": _run(1.3, 0.3, para=0.3, guard="agc"),
        "f": _run(0.9, 0.0, n=0, guard="caption_noise"),
        "l1": _run(0.5, 0.0, mode="lora", guard="penalty"),
        "l2": _run(2.0, 0.9, mode="lora"),
    }


def test_pareto_front_exact(runs):
    assert pareto_front(runs, "full") == ["a", "b", "d"]
    assert pareto_front(runs, "lora") == ["l1"]
    assert pareto_front(runs, "no such mode") == []


def test_pareto_front_paraphrased(runs):
    # (loss, paraphrase rate): a (1.0, 0.2), b/d (1.2, 0.4), c (1.1, 0.1), e (1.3, 0.3)
    # b, d: a has lower loss and lower copy -> dominated; e: c is better on both -> dominated.
    assert pareto_front(runs, "full", "copy_paraphrase") == ["a", "c"]


def test_penalty_line_sorted_by_weight_per_mode(runs):
    runs = dict(runs, p_mid=_run(1.15, 0.2, guard="penalty", weight=0.1))
    assert penalty_line(runs, "full") == ["d", "p_mid", "b"]   # weights 0.03, 0.1, 0.3
    assert penalty_line(runs, "lora") == ["l1"]


def test_plot_writes_a_two_panel_png(runs, tmp_path):
    from PIL import Image

    path = plot_tradeoff(runs, tmp_path / "sub" / "tradeoff.png", LABELS)
    assert path == tmp_path / "sub" / "tradeoff.png" and path.stat().st_size > 10_000
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert 800 <= w <= 2000 and 400 <= h <= 1200 and w > h   # two panels side by side
    assert colors is None or len(colors) > 50                 # not a blank canvas


def test_plot_refuses_no_runs(tmp_path):
    with pytest.raises(ValueError, match="no runs"):
        plot_tradeoff({}, tmp_path / "x.png", LABELS)
    assert not (tmp_path / "x.png").exists()


def test_x_range_leaves_a_broken_run_off_the_scale():
    from memreg.demo.tradeoff import x_range

    runs = {"a": _run(0.10, 0.5), "b": _run(0.12, 0.1), "broken": _run(1.00, 0.0)}
    lo, hi = x_range(runs)                  # up to 1.5 x 0.10: 0.10 .. 0.12, margin 5% of 0.02
    assert lo == pytest.approx(0.099) and hi == pytest.approx(0.121)
    assert x_range({"a": _run(0.1, 0.5)}) == pytest.approx((0.095, 0.105))


def test_plot_colours_are_the_reports_and_every_run_needs_one(runs, tmp_path):
    from memreg.report import run_colors

    assert run_colors(["x", "y"]) == {"x": "#1f77b4", "y": "#ff7f0e"}   # tab10, the report's order
    with pytest.raises(ValueError, match="no colour for run"):
        plot_tradeoff(runs, tmp_path / "x.png", LABELS, colors={"none": "#000000"})
    broken = dict(runs, broken=_run(9.0, 0.0))
    assert plot_tradeoff(broken, tmp_path / "y.png", LABELS).stat().st_size > 10_000


def test_label_lifts_stack_crowded_names_only():
    from memreg.demo.tradeoff import LABEL_STEP, label_lifts

    # width 1: a, b, c at copy 0 within 0.12 of each other in x; d far right; e high up
    pts = {"a": (0.00, 0.0), "b": (0.05, 0.0), "c": (0.10, 0.0), "d": (0.9, 0.0), "e": (0.05, 0.5)}
    assert label_lifts(pts, 1.0) == {"a": 0, "b": LABEL_STEP, "c": 2 * LABEL_STEP, "d": 0, "e": 0}
