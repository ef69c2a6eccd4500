"""`memreg report` (memreg/commands/report.py, memreg/report.py): static HTML from TensorBoard event files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from memreg import log_tags, report
from memreg.commands import report as report_cmd


def _write_run(run_dir: Path, seed: int, resume: bool = False, loss_tag: str = "loss_mse",
               time_tag: str = "train/step_time") -> None:
    """Event files as the training loop + monitor write them (accelerate layout: run_dir/<name>/events...)."""
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(seed)
    spans = [(0, 6), (6, 11)] if resume else [(0, 11)]
    for k, (lo, hi) in enumerate(spans):
        w = SummaryWriter(str(run_dir / "memreg" / f"part{k}"))
        for step in range(lo, hi):
            w.add_scalar(loss_tag, float(1 / (step + 1) + rng.random() * 0.01), step)
            w.add_scalar(time_tag, float(0.1 + rng.random() * 0.01), step)
            for g in ("duplicated", "ordinary"):                  # the penalty guard's selectivity logs
                w.add_scalar(f"guard/gate_rate/{g}", float(rng.random()), step)
                w.add_scalar(f"guard/fire_rate/{g}", float(rng.random()), step)
            if step % 5 == 0:
                for g in ("duplicated", "unique", "heldout"):
                    for t in ("score", "norm", "align"):
                        for q in ("mean", "p50", "p95"):
                            w.add_scalar(f"eval/{g}/{t}_{q}", float(rng.random()), step)
                for c in ("duplicated_vs_heldout", "duplicated_vs_unique"):
                    for t in ("score", "norm", "align"):
                        w.add_scalar(f"eval/auc/{c}/{t}", float(rng.random()), step)
                        w.add_scalar(f"eval/tpr_at_1pct_fpr/{c}/{t}", float(rng.random()), step)
                w.add_text("eval/top_k_captions", f"| rank | caption |\n|---|---|\n| 1 | <b>step {step}</b> |", step)
        if hi == 11:
            for g in ("duplicated", "heldout"):
                w.add_scalar(f"copy/{g}/memorized_frac", 0.5, 10)
                w.add_scalar(f"copy/{g}/sim_p95", 0.7, 10)
                img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
                w.add_image(f"copy_grid/{g}", img, 10, dataformats="HWC")
        w.close()


@pytest.fixture
def two_runs(tmp_path):
    a, b = tmp_path / "run_alpha", tmp_path / "run_beta"
    _write_run(a, 0, resume=True)
    _write_run(b, 1, loss_tag="train/loss_mse", time_tag="perf/step_time_s")  # the training loop's names
    return a, b


def test_report_two_runs(two_runs, tmp_path):
    out = tmp_path / "site" / "report.html"
    assert report_cmd.main([str(two_runs[0]), str(two_runs[1]), "--out", str(out)]) == 0
    page = out.read_text()
    assert "run_alpha" in page and "run_beta" in page
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert srcs
    for src in srcs:
        assert (out.parent / src).is_file() and (out.parent / src).read_bytes()[:4] == b"\x89PNG"
    names = {Path(s).name for s in srcs}
    for expected in ("score_curves.png", "auc_curves.png", "memorized_frac.png", "loss.png", "step_time.png",
                     "guard_selectivity.png", "run0_copy_grid_duplicated.png", "run1_copy_grid_heldout.png"):
        assert expected in names
    assert "&lt;b&gt;step 10&lt;/b&gt;" in page        # latest top-k text, HTML-escaped
    assert "<script" not in page
    runs = [report.load_run(d) for d in two_runs]
    assert [r.logged(log_tags.PERF_STEP_TIME_NAMES) for r in runs] == [["train/step_time"], ["perf/step_time_s"]]
    assert [r.logged(log_tags.TRAIN_LOSS_MSE_NAMES) for r in runs] == [["loss_mse"], ["train/loss_mse"]]


def test_report_reads_all_event_files_of_a_resumed_run(two_runs):
    run = report.load_run(two_runs[0])
    assert len(run.event_files) == 2
    assert sorted(run.scalars["loss_mse"]) == list(range(11))
    assert sorted(run.scalars["eval/duplicated/score_mean"]) == [0, 5, 10]
    assert run.images["copy_grid/duplicated"][0] == 10


def test_report_refuses_overwrite_and_bad_dirs(two_runs, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert report_cmd.main([str(two_runs[0]), "--out", str(out)]) == 0
    first = out.read_text()
    assert report_cmd.main([str(two_runs[1]), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == first
    assert report_cmd.main([str(two_runs[1]), "--out", str(out), "--overwrite"]) == 0
    assert "run_beta" in out.read_text()

    empty = tmp_path / "empty_run"
    (empty / "sub").mkdir(parents=True)
    assert report_cmd.main([str(empty), "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "empty_run" in err and "no TensorBoard event files" in err
    assert not (tmp_path / "x.html").exists()
    assert report_cmd.main([str(tmp_path / "missing"), "--out", str(tmp_path / "y.html")]) == 2


def test_report_via_cli(two_runs, tmp_path):
    cli = pytest.importorskip("memreg.cli")
    out = tmp_path / "cli.html"
    try:
        rc = cli.main(["report", str(two_runs[0]), str(two_runs[1]), "--out", str(out)])
    except SystemExit as e:  # argparse: the report subcommand is not registered (yet)
        pytest.skip(f"memreg.cli has no working 'report' subcommand (exit {e.code})")
    assert rc in (0, None) and "run_beta" in out.read_text()


# ---------------------------------------------------------------------- readability (issue 12)

class _Tables:
    """Header cells and body rows of every <table>, and alt/caption of every <figure>, with html.parser."""

    def __init__(self, page: str):
        from html.parser import HTMLParser

        self.tables: list[dict] = []
        self.figures: list[dict] = []
        outer = self

        class P(HTMLParser):
            cell = None

            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                if tag == "table":
                    outer.tables.append({"head": [], "rows": []})
                elif tag == "tr" and outer.tables:
                    outer.tables[-1]["rows"].append([])
                elif tag in ("th", "td"):
                    self.cell = [tag, ""]
                elif tag == "figure":
                    outer.figures.append({"alt": "", "caption": ""})
                elif tag == "img" and outer.figures and not outer.figures[-1]["alt"]:
                    outer.figures[-1]["alt"] = a.get("alt", "")
                elif tag == "figcaption":
                    self.cell = ["figcaption", ""]

            def handle_data(self, data):
                if self.cell is not None:
                    self.cell[1] += data

            def handle_endtag(self, tag):
                if tag in ("th", "td") and self.cell:
                    t = outer.tables[-1]
                    (t["head"] if self.cell[0] == "th" else t["rows"][-1]).append(self.cell[1].strip())
                    self.cell = None
                elif tag == "figcaption" and self.cell:
                    outer.figures[-1]["caption"] = self.cell[1]
                    self.cell = None

        P().feed(page)


def _write_copy_series(run_dir: Path, steps: list[int], value: float) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(run_dir / "memreg" / "copy"))
    for s in steps:
        w.add_scalar("copy/duplicated/memorized_frac", value + 0.01 * s, s)
    w.close()


@pytest.fixture
def recorded(monkeypatch):
    """Every plot/bar call (label, colour) per PNG, and every figure legend's labels."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    calls = {"lines": [], "bars": [], "legends": []}
    real_plot, real_bar, real_legend = Axes.plot, Axes.bar, Figure.legend

    def plot(self, *a, **k):
        calls["lines"].append((id(self.figure), k.get("label"), k.get("color")))
        return real_plot(self, *a, **k)

    def bar(self, x, height, *a, **k):
        calls["bars"].append((id(self.figure), k.get("label"), k.get("color"), float(height)))
        return real_bar(self, x, height, *a, **k)

    def legend(self, handles, labels, **k):
        calls["legends"].append((id(self), list(labels), k.get("loc")))
        return real_legend(self, handles, labels, **k)

    monkeypatch.setattr(Axes, "plot", plot)
    monkeypatch.setattr(Axes, "bar", bar)
    monkeypatch.setattr(Figure, "legend", legend)
    return calls


def test_every_table_header_and_plot_legend_names_every_run(two_runs, tmp_path, recorded):
    gamma = tmp_path / "run_gamma"
    _write_run(gamma, 2)
    dirs = [*two_runs, gamma]
    names = ["run_alpha", "run_beta", "run_gamma"]
    runs = [report.load_run(d) for d in dirs]
    assert all(r.name == "" for r in runs)                 # as the demo calls it: no _name_runs first
    out = tmp_path / "r.html"
    report.build_report(runs, out)
    page = _Tables(out.read_text())
    runs_table, *per_run_tables = page.tables
    assert [row[0] for row in runs_table["rows"][1:]] == names        # no empty "run" column
    assert len(per_run_tables) == 2                                    # latest values, latest images
    for t in per_run_tables:
        assert t["head"][1:] == names
    assert len(page.figures) == 9                                      # the guard selectivity plot too
    for fig in page.figures:
        for n in names:
            assert n in fig["alt"] and n in fig["caption"]
    # the labels matplotlib drew: one figure legend per plot, below the axes, naming every run
    assert len(recorded["legends"]) == 9
    for _, labels, loc in recorded["legends"]:
        assert labels[:3] == names and loc == "outside lower center"
    # one colour per run across all plots, and every run drawn in the loss plot
    colour = {}
    for _, label, c, *_ in recorded["lines"] + recorded["bars"]:
        colour.setdefault(label, set()).add(tuple(c))
    assert sorted(colour) == names and all(len(c) == 1 for c in colour.values())
    assert len({next(iter(c)) for c in colour.values()}) == 3


def test_the_loss_plot_shows_runs_whose_curves_coincide(tmp_path, recorded):
    a, b = tmp_path / "none", tmp_path / "penalty"
    _write_run(a, 0, loss_tag="train/loss_mse")
    _write_run(b, 0, loss_tag="train/loss_mse")            # identical curves (a guard that never fired)
    runs = [report.load_run(d) for d in (a, b)]
    report.build_report(runs, tmp_path / "r.html")
    loss_fig = recorded["lines"][-4][0]                      # loss is drawn before the step-time plot
    loss_lines = [x for x in recorded["lines"] if x[0] == loss_fig]
    assert [lbl for _, lbl, _ in loss_lines] == ["none", "penalty"]
    page = (tmp_path / "r.html").read_text()
    assert "identical values: none = penalty" in page


def test_copy_check_logged_once_is_bars_and_logged_often_is_a_step_series(tmp_path, recorded):
    once, often = tmp_path / "once", tmp_path / "often"
    _write_copy_series(once, [600], 0.5)
    _write_copy_series(often, [0, 200, 400, 600], 0.1)
    report.build_report([report.load_run(once)], tmp_path / "a.html")
    assert [(lbl, h) for _, lbl, _, h in recorded["bars"]] == [("once", pytest.approx(0.5 + 6.0))]
    assert not recorded["lines"]
    report.build_report([report.load_run(often)], tmp_path / "b.html")
    assert [lbl for _, lbl, _ in recorded["lines"]] == ["often"] and len(recorded["bars"]) == 1


def test_runs_with_one_directory_name_are_named_by_the_fewest_path_parts_that_tell_them_apart(tmp_path):
    paths = [tmp_path / "demo" / "runs" / "none", tmp_path / "demo" / "web" / "runs" / "none",
             tmp_path / "x" / "penalty", tmp_path / "y" / "penalty", tmp_path / "lora"]
    runs = [report.RunData(p) for p in paths] + [report.RunData(paths[-1])]   # the same directory twice
    report.name_runs(runs)
    assert [r.name for r in runs] == ["demo/runs/none", "web/runs/none", "x/penalty", "y/penalty", "lora",
                                      "lora (2)"]
