"""``memreg generate`` (memreg/commands/generate.py) on the tiny pipeline."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from PIL import Image

from memreg.cli import main

PROMPTS = ["a red circle on a blue background", "a dog in the garden", "the old house"]
ORDINARY = ["a green tree", "two cats on a table", "the sea at sunset", "a man with a book"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen_prompts")
    (d / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    (d / "ordinary.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n" for c in ORDINARY))
    return d


def _run(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def score_run(tmp_path_factory, tiny_sd_eps, files):
    out = tmp_path_factory.mktemp("gen") / "out"
    rc, stdout = _run(["generate", "--model", str(tiny_sd_eps), "--prompts", str(files / "p.txt"), "--out", str(out),
                       "--calibrate", str(files / "ordinary.jsonl"), "--tau-quantile", "0.5",
                       "--target-quantile", "0.0", "--images-per-prompt", "2", "--steps", "3", "--max-steps", "2", "--batch-size", "4", "--draws", "2",
                       "--no-progress"])
    return rc, stdout, out


def test_generate_happy_path(score_run):
    rc, stdout, out = score_run
    assert rc == 0 and "6 images" in stdout
    rows = [json.loads(x) for x in (out / "mitigation.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [(p, 2 * i + j) for i, p in enumerate(PROMPTS) for j in range(2)]
    settings = json.loads((out / "settings.json").read_text())
    tau, target = settings["config"]["tau"], settings["config"]["target"]
    assert target <= tau and settings["tau_quantile"] == 0.5 and settings["target_quantile"] == 0.0
    # the budget given, the score's own step size where --lr is not: settings.json records what ran
    assert [settings["config"][k] for k in ("max_steps", "lr", "stop_streak")] == [2, 0.1, 2]
    for r in rows:
        assert set(r) >= {"flagged", "score_before", "score_after", "steps", "seconds", "image"}
        assert r["flagged"] == (r["score_before"] > tau) and r["tau"] == tau and 0 <= r["steps"] <= 2
        assert r["steps"] == 0 or r["flagged"]
        assert not r["flagged"] or r["score_after"] <= target or r["steps"] == 2  # stopped at the target or the budget
        assert Image.open(out / r["image"]).size == (32, 32)
    assert any(r["flagged"] for r in rows)  # tau = the median ordinary score
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 6 * 96 and sheet.mode == "RGB"


def test_generate_refuses_a_non_empty_out(score_run, tiny_sd_eps, files, capsys):
    _, _, out = score_run
    before = (out / "mitigation.jsonl").read_text()
    rc, _ = _run(["generate", "--model", str(tiny_sd_eps), "--prompts", str(files / "p.txt"), "--out", str(out),
                  "--mitigate", "none"])
    assert rc == 2 and "is not empty" in capsys.readouterr().err
    assert (out / "mitigation.jsonl").read_text() == before


def test_generate_none_and_wen(tmp_path, tiny_sd_eps, files):
    for mode, extra in (("none", []), ("wen", ["--tau", "0.0"])):
        out = tmp_path / mode
        rc, _ = _run(["generate", "--model", str(tiny_sd_eps), "--prompts", str(files / "p.txt"), "--out", str(out),
                      "--mitigate", mode, "--steps", "2", "--max-steps", "1", "--no-progress", *extra])
        assert rc == 0
        rows = [json.loads(x) for x in (out / "mitigation.jsonl").read_text().splitlines()]
        assert len(rows) == 3
        if mode == "none":
            assert all(not r["flagged"] and r["score_before"] is None for r in rows)
        else:  # target loss 0: every prompt is flagged and runs its budget
            assert all(r["flagged"] and r["steps"] == 1 and r["criterion"] == "wen_guidance_norm" for r in rows)
            config = json.loads((out / "settings.json").read_text())["config"]
            assert (config["lr"], config["stop_streak"]) == (0.05, 1)          # Wen et al.'s rule


@pytest.mark.parametrize("extra, needle", [
    (["--mitigate", "score"], "needs exactly one of --tau or --calibrate"),
    (["--tau", "1", "--calibrate", "x.txt"], "needs exactly one of --tau or --calibrate"),
    (["--mitigate", "none", "--tau", "1"], "--mitigate none takes neither"),
    (["--tau", "1", "--images-per-prompt", "0"], "--images-per-prompt must be >= 1"),
    (["--tau", "1", "--tau-quantile", "2"], "need 0 <= --target-quantile <= --tau-quantile <= 1"),
    (["--tau", "1", "--target-quantile", "0.99"], "need 0 <= --target-quantile <= --tau-quantile"),
    (["--tau", "1", "--target", "2"], "--target needs --tau and must be <= it"),
    (["--tau", "1", "--preset", "sd1", "--g1", "2"], "exclusive"),
    (["--tau", "1", "--dtype", "float8"], "unknown dtype"),
])
def test_generate_bad_settings(tmp_path, tiny_sd_eps, files, capsys, extra, needle):
    rc, _ = _run(["generate", "--model", str(tiny_sd_eps), "--prompts", str(files / "p.txt"),
                  "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_generate_bad_files(tmp_path, tiny_sd_eps, files, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (["--prompts", str(tmp_path / "missing.txt"), "--model", str(tiny_sd_eps)], "--prompts: prompt file"),
        (["--prompts", str(empty), "--model", str(tiny_sd_eps)], "has no prompts"),
        (["--prompts", str(files / "p.txt"), "--model", str(tmp_path)], "has no unet/ subfolder"),
    ]
    for argv, needle in cases:
        rc, _ = _run(["generate", *argv, "--out", str(tmp_path / "o"), "--tau", "1"])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and err.startswith("memreg generate: error:"), err
