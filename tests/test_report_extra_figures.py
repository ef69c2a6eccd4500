"""memreg/report.py: ``build_report(..., extra_figures=...)`` copies figures made elsewhere onto the page."""

import re
from pathlib import Path

import pytest

from memreg import report


def _png(path: Path, color) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 30), color).save(path)
    return path


def _runs(tmp_path):
    return [report.RunData(tmp_path / "run_a", scalars={"train/loss_mse": {0: 1.0, 1: 0.5}})]


def test_extra_figures_are_copied_and_shown_first(tmp_path):
    src = _png(tmp_path / "trade off.png", (255, 0, 0))
    src2 = _png(tmp_path / "other.png", (0, 0, 255))
    out = tmp_path / "site" / "report.html"
    written = report.build_report(_runs(tmp_path), out, title="demo",
                                  extra_figures=[(src, "Copy rate vs loss", "lower-left is <better>"),
                                                 (src2, "Second", "two")])
    page = out.read_text()
    imgs = re.findall(r"<img src='([^']+)' alt='([^']*)'", page)
    assert len(imgs) >= 2
    (first_src, first_alt), (second_src, _) = imgs[:2]     # before the report's own plots
    assert (out.parent / first_src).read_bytes() == src.read_bytes()
    assert (out.parent / second_src).read_bytes() == src2.read_bytes()
    assert first_src != second_src and out.parent / first_src in written
    assert first_alt == "Copy rate vs loss. lower-left is &lt;better&gt;"
    assert "<h2>Copy rate vs loss</h2>" in page
    assert page.index("Copy rate vs loss") < page.index("<h2>Runs</h2>")
    assert "<figcaption>lower-left is &lt;better&gt;</figcaption>" in page


def test_without_extra_figures_the_runs_table_follows_the_title(tmp_path):
    out = tmp_path / "r.html"
    written = report.build_report(_runs(tmp_path), out, title="t")
    assert "<h1>t</h1>\n<h2>Runs</h2>" in out.read_text()
    assert not any(p.name.startswith("extra") for p in written)


def test_missing_extra_figure_is_a_clear_error(tmp_path):
    with pytest.raises(report.ReportError, match="nope.png"):
        report.build_report(_runs(tmp_path), tmp_path / "r.html", extra_figures=[(tmp_path / "nope.png", "h", "c")])
    assert not (tmp_path / "r.html").exists()
