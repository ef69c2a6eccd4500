"""``memreg detect`` end to end on the tiny pipeline, its bad-input errors, and the scoring loop."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memreg.cli import main

N_SUBSET = 32


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny UNet gains nothing from 2 threads, and on a shared 2-core machine OpenMP's
    spin-waiting makes 2-thread runs up to 100x slower under contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _subset(src: Path, dst: Path, n: int = N_SUBSET, blank_every: int = 0) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()[:n]
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        if blank_every and i % blank_every == 0:
            out.append("")
    dst.write_text("\n".join(out) + "\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory, shared_prompts):
    d = tmp_path_factory.mktemp("prompts")
    mem = _subset(shared_prompts / "sd1_mem.txt", d / "mem.txt", blank_every=10)  # 4 blank lines
    nonmem = _subset(shared_prompts / "sd1_nmem.txt", d / "nonmem.txt")
    return mem, nonmem


@pytest.fixture(scope="module")
def detect_run(tmp_path_factory, tiny_sd_eps, prompt_files):
    """One in-process ``memreg detect`` run shared by the output checks."""
    mem, nonmem = prompt_files
    out = tmp_path_factory.mktemp("detect") / "out"
    argv = ["detect", "--model", str(tiny_sd_eps), "--mem", str(mem), "--nonmem", str(nonmem),
            "--out", str(out), "--seeds", "1", "--batch-size", "8", "--fit-weights", "--no-progress"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return {"rc": rc, "out": out, "stdout": buf.getvalue(), "argv": argv}


def _report(run) -> dict:
    return json.loads((run["out"] / "report.json").read_text())


def test_detect_exit_code_and_printed_table(detect_run):
    assert detect_run["rc"] == 0
    table = detect_run["stdout"]
    for word in ("AUC", "TPR@1%FPR", "TPR@~3%FPR", "norm", "align", "score", "wen", "fitted", "prompts/s"):
        assert word in table


def test_detect_report_fields(detect_run, tiny_sd_eps):
    r = _report(detect_run)
    assert r["model"] == str(tiny_sd_eps)
    assert r["prediction_type"] == "epsilon"
    s = r["settings"]
    assert (s["t_hi"], s["t_lo"], s["g1"], s["g2"], s["preset"]) == (981, 41, 1.0, 2.0, "sd1")
    assert s["seeds"] == [0] and s["batch_size"] == 8 and s["space"] == "eps"
    assert s["dtype"] == "float32" and s["device"] == "cpu" and s["wen_steps"] == 1
    d = r["data"]
    assert d["mem"]["prompts"] == N_SUBSET and d["nonmem"]["prompts"] == N_SUBSET
    assert d["mem"]["blank_lines_skipped"] == 4 and d["nonmem"]["blank_lines_skipped"] == 0
    assert d["truncated_prompts"] == d["mem"]["truncated"] + d["nonmem"]["truncated"]
    for term in ("norm", "align", "score", "wen"):
        m = r["metrics"][term]
        assert 0.0 <= m["auc"] <= 1.0
        for conv in ("tpr_at_fpr", "tpr_at_fpr_closest"):
            assert set(m[conv]) == {"1%", "3%"}
            assert all(0.0 <= v <= 1.0 for v in m[conv].values())
    assert r["timing"]["prompts_per_s"] > 0
    assert {"torch", "diffusers"} <= set(r["versions"])
    assert r["versions"]["torch"] == torch.__version__


def test_detect_scores_jsonl(detect_run, prompt_files):
    rows = [json.loads(line) for line in (detect_run["out"] / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * N_SUBSET
    assert [r["label"] for r in rows] == [1] * N_SUBSET + [0] * N_SUBSET
    mem_prompts = [p for p in prompt_files[0].read_text().splitlines() if p.strip()]
    assert [r["prompt"] for r in rows[:N_SUBSET]] == mem_prompts
    for r in rows:
        assert {"prompt", "label", "norm", "align", "score", "wen"} <= set(r)
        assert r["norm"] >= 0 and -1 <= r["align"] <= 1
        # sd1 preset: score = 1 * norm + 2 * align
        assert r["score"] == pytest.approx(r["norm"] + 2 * r["align"], rel=1e-5, abs=1e-6)
        assert r["wen"] == r["norm"]  # single-step eps Wen reuses the norm term


def test_detect_roc_png(detect_run):
    png = detect_run["out"] / "roc.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_detect_fit_weights(detect_run):
    fw = _report(detect_run)["fit_weights"]
    assert fw["folds"] == 5
    for k in ("g1", "g2"):
        assert np.isfinite(fw[k])
    st = fw["standardized"]
    # raw-unit weights are the standardized ones divided by the feature std
    assert fw["g1"] == pytest.approx(st["w_norm"] / st["std"][0])
    assert fw["g2"] == pytest.approx(st["w_align"] / st["std"][1])
    assert 0.0 <= fw["out_of_fold"]["auc"] <= 1.0
    assert set(fw["out_of_fold"]["tpr_at_fpr"]) == {"1%", "3%"}


def test_detect_refuses_to_overwrite(detect_run, capsys):
    before = (detect_run["out"] / "report.json").read_bytes()
    assert main(detect_run["argv"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(detect_run["out"]) in err
    assert (detect_run["out"] / "report.json").read_bytes() == before


# ------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line naming the file / field, checked before the model loads
# ------------------------------------------------------------------------------------------

def _run_err(capsys, model, mem, nonmem, out):
    rc = main(["detect", "--model", str(model), "--mem", str(mem), "--nonmem", str(nonmem),
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_error_missing_prompt_file(tmp_path, capsys, prompt_files):
    missing = tmp_path / "nope.txt"
    # the model path is bogus too: prompt files are validated first
    rc, err = _run_err(capsys, tmp_path / "no_model", missing, prompt_files[1], tmp_path / "out")
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--mem" in err and str(missing) in err
    assert not (tmp_path / "out").exists()


def test_error_empty_prompt_file(tmp_path, capsys, prompt_files, tiny_sd_eps):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    rc, err = _run_err(capsys, tiny_sd_eps, prompt_files[0], empty, tmp_path / "out")
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--nonmem" in err and str(empty) in err and "no prompts" in err


def test_error_jsonl_without_caption(tmp_path, capsys, prompt_files, tiny_sd_eps):
    bad = tmp_path / "mem.jsonl"
    bad.write_text(json.dumps({"caption": "a red car"}) + "\n" + json.dumps({"text": "a dog"}) + "\n")
    rc, err = _run_err(capsys, tiny_sd_eps, bad, prompt_files[1], tmp_path / "out")
    assert rc == 2
    assert len(err.splitlines()) == 1 and f"{bad}:2" in err and "'caption'" in err


def test_error_model_dir_without_unet(tmp_path, capsys, prompt_files, tiny_sd_eps):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_eps, model, ignore=shutil.ignore_patterns("unet"))
    rc, err = _run_err(capsys, model, prompt_files[0], prompt_files[1], tmp_path / "out")
    assert rc == 2
    assert len(err.splitlines()) == 1 and str(model) in err and "unet/" in err


@pytest.mark.parametrize("extra,needle", [(["--seeds", "0"], "--seeds"), (["--preset", "sd2", "--g1", "2"], "--preset"),
                                          (["--t-hi", "5000"], "--t-hi"), (["--t-lo", "-1"], "--t-lo")])
def test_error_bad_settings(tmp_path, capsys, prompt_files, tiny_sd_eps, extra, needle):
    rc = main(["detect", "--model", str(tiny_sd_eps), "--mem", str(prompt_files[0]), "--nonmem", str(prompt_files[1]),
               "--out", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------
# The scoring loop: batch independence, Wen reuse, seed averaging
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loop_parts(tiny_sd_eps, shared_prompts):
    from memreg.encoding import PromptEncoder
    from memreg.models import load_components
    from memreg.score import AnisotropyScore

    comps = load_components(str(tiny_sd_eps), with_vae=False)
    scorer = AnisotropyScore(comps.unet, comps.scheduler, preset="sd1")
    encoder = PromptEncoder(comps.tokenizer, comps.text_encoder)
    lines = (shared_prompts / "sd1_mem.txt").read_text().splitlines()[:5]
    lines += (shared_prompts / "sd1_nmem.txt").read_text().splitlines()[:4]
    return comps, scorer, encoder, lines


@pytest.mark.parametrize("noise", ["shared", "per-prompt"])
def test_batch_of_4_equals_single_calls(loop_parts, noise):
    from memreg.detect import score_prompts

    comps, scorer, encoder, prompts = loop_parts
    kw = dict(seeds=[0, 1], noise=noise, wen_steps=1)
    a = score_prompts(scorer, encoder, comps.scheduler, prompts, batch_size=4, **kw)
    b = score_prompts(scorer, encoder, comps.scheduler, prompts, batch_size=1, **kw)
    for term in ("norm", "align", "score", "wen"):
        np.testing.assert_allclose(a.term(term), b.term(term), rtol=1e-5, atol=1e-5, err_msg=term)
    assert a.truncated == b.truncated
    # and different prompts really get different scores
    assert np.ptp(a.score) > 1e-4


def test_noise_depends_on_seed_and_mode_not_on_order(loop_parts):
    from memreg.score import noise_latents

    comps, _, _, prompts = loop_parts
    unet = comps.unet
    sh = noise_latents(unet, prompts[:3], seed=7, noise="shared")
    assert torch.equal(sh[0], sh[2])
    assert torch.equal(sh[0], noise_latents(unet, prompts[:1], seed=7)[0])
    assert not torch.equal(sh[0], noise_latents(unet, prompts[:1], seed=8)[0])
    pp = noise_latents(unet, prompts[:3], seed=7, noise="per-prompt")
    assert not torch.equal(pp[0], pp[1])
    rev = noise_latents(unet, prompts[:3][::-1], seed=7, noise="per-prompt")
    assert torch.equal(pp[0], rev[2])  # keyed by the prompt text, not its position


def test_wen_reuse_agrees_with_wen_multistep_norm(loop_parts):
    from memreg.detect import score_prompts

    comps, scorer, encoder, prompts = loop_parts
    reused = score_prompts(scorer, encoder, comps.scheduler, prompts, seeds=[3], batch_size=4, wen_steps=1)
    direct = score_prompts(scorer, encoder, comps.scheduler, prompts, seeds=[3], batch_size=4, wen_steps=1,
                           reuse_wen=False)
    assert reused.wen_reused_norm and not direct.wen_reused_norm
    np.testing.assert_allclose(reused.wen, direct.wen, rtol=1e-5, atol=1e-6)


def test_seed_average(loop_parts):
    from memreg.detect import score_prompts

    comps, scorer, encoder, prompts = loop_parts
    run = lambda seeds: score_prompts(scorer, encoder, comps.scheduler, prompts, seeds=seeds, batch_size=9, wen_steps=0)
    both, s0, s1 = run([0, 1]), run([0]), run([1])
    assert both.wen is None
    np.testing.assert_allclose(both.score, (s0.score + s1.score) / 2, rtol=1e-6, atol=1e-7)
    assert not np.allclose(s0.norm, s1.norm)


# ------------------------------------------------------------------------------------------
# The console entry, as a separate process (SD2-like settings: v-prediction, score space)
# ------------------------------------------------------------------------------------------

def test_console_entry_subprocess_sd2_path(tmp_path, tiny_sd_v):
    mem = tmp_path / "mem.jsonl"
    long_prompt = " ".join(["a red car on a road near the sea"] * 12)  # > 77 tokens
    mem.write_text("\n".join(json.dumps({"caption": c}) for c in ["a red car", long_prompt, "", "the moon"]) + "\n")
    nonmem = tmp_path / "nonmem.txt"
    nonmem.write_text("a dog\n\na cat on a chair\nan old house\n")
    exe = Path(sys.executable).with_name("memreg")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "memreg.cli"]
    out = tmp_path / "out"
    proc = subprocess.run(cmd + ["detect", "--model", str(tiny_sd_v), "--mem", str(mem), "--nonmem", str(nonmem),
                                 "--out", str(out), "--preset", "sd2", "--space", "score", "--wen-steps", "2",
                                 "--batch-size", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "AUC" in proc.stdout
    r = json.loads((out / "report.json").read_text())
    assert r["prediction_type"] == "v_prediction"
    assert r["settings"]["space"] == "score" and (r["settings"]["g1"], r["settings"]["g2"]) == (1.0, 0.1)
    assert r["settings"]["wen_reused_norm"] is False
    assert r["data"]["mem"]["blank_lines_skipped"] == 1 and r["data"]["nonmem"]["blank_lines_skipped"] == 1
    assert r["data"]["truncated_prompts"] == 1 and r["data"]["mem"]["truncated"] == 1
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and [row["truncated"] for row in rows].count(True) == 1


def test_shared_uncond_cache_matches_full_4b_call(loop_parts):
    from memreg.detect import score_prompts

    comps, scorer, encoder, prompts = loop_parts
    kw = dict(seeds=[0, 5], batch_size=3, wen_steps=1, noise="shared")
    cached = score_prompts(scorer, encoder, comps.scheduler, prompts, share_uncond=True, **kw)
    full = score_prompts(scorer, encoder, comps.scheduler, prompts, share_uncond=False, **kw)
    for term in ("norm", "align", "score", "wen"):
        np.testing.assert_allclose(cached.term(term), full.term(term), rtol=1e-5, atol=1e-5, err_msg=term)


def test_shared_uncond_cache_v_prediction_score_space(v_components, shared_prompts):
    from memreg.detect import score_prompts
    from memreg.encoding import PromptEncoder
    from memreg.score import AnisotropyScore

    scorer = AnisotropyScore(v_components.unet, v_components.scheduler, preset="sd2", space="score")
    encoder = PromptEncoder(v_components.tokenizer, v_components.text_encoder)
    prompts = (shared_prompts / "sd2_mem.txt").read_text().splitlines()[:4]
    kw = dict(seeds=[1], batch_size=2, wen_steps=0, noise="shared")
    cached = score_prompts(scorer, encoder, v_components.scheduler, prompts, share_uncond=True, **kw)
    full = score_prompts(scorer, encoder, v_components.scheduler, prompts, share_uncond=False, **kw)
    single = score_prompts(scorer, encoder, v_components.scheduler, prompts, share_uncond=True,
                           **{**kw, "batch_size": 1})
    for term in ("norm", "align", "score"):
        np.testing.assert_allclose(cached.term(term), full.term(term), rtol=1e-5, atol=1e-5, err_msg=term)
        np.testing.assert_allclose(cached.term(term), single.term(term), rtol=1e-5, atol=1e-5, err_msg=term)


# ------------------------------------------------------------------------------------------
# Sharded scoring (--shard-size, accelerate launch): parts under --out/parts, resume, N processes
# ------------------------------------------------------------------------------------------

SHARD = 16  # 64 prompts -> 4 shards of 2 batches of 8


def _argv_with_out(run, out: Path, *extra) -> list[str]:
    argv = list(run["argv"])
    argv[argv.index("--out") + 1] = str(out)
    return argv + list(extra)


def _part_headers(out: Path) -> list[dict]:
    return [json.loads(p.read_text().splitlines()[0]) for p in sorted((out / "parts").glob("shard-*.jsonl"))]


@pytest.fixture(scope="module")
def sharded_run(detect_run, tmp_path_factory):
    """The same run as ``detect_run`` on one process, scored in 4 resumable shards."""
    out = tmp_path_factory.mktemp("detect_sharded") / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(_argv_with_out(detect_run, out, "--shard-size", str(SHARD)))
    return {"rc": rc, "out": out}


def test_sharded_one_process_equals_unsharded(detect_run, sharded_run):
    out = sharded_run["out"]
    assert sharded_run["rc"] == 0
    heads = _part_headers(out)
    assert [(h["shard"], h["start"], h["stop"], h["rank"]) for h in heads] == [
        (0, 0, 16, 0), (1, 16, 32, 0), (2, 32, 48, 0), (3, 48, 64, 0)]
    # same batches of 8 as the unsharded run, so the very same floats
    assert (out / "scores.jsonl").read_text() == (detect_run["out"] / "scores.jsonl").read_text()
    a, b = _report(detect_run), json.loads((out / "report.json").read_text())
    assert a["metrics"] == b["metrics"] and a["fit_weights"] == b["fit_weights"]
    assert b["settings"]["shard_size"] == SHARD and b["timing"]["processes"] == 1
    assert "shard_size" not in a["settings"]  # the plain run is unchanged: no parts, no new fields
    assert not (detect_run["out"] / "parts").exists()


def test_sharded_resume_scores_only_missing_shards(detect_run, sharded_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(sharded_run["out"], out)
    argv = _argv_with_out(detect_run, out, "--shard-size", str(SHARD))
    capsys.readouterr()
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # finished outputs are kept
    (out / "parts" / "shard-00002.jsonl").unlink()  # as if killed before shard 2 was written ...
    (out / "parts" / ".shard-00002.jsonl.99.tmp").write_text('{"shard": 2}\n{"i": 32')  # ... mid-write
    assert main(argv + ["--overwrite"]) == 0
    assert "process 0/1: 1 shard(s) scored, 3 already finished" in capsys.readouterr().err
    assert (out / "scores.jsonl").read_text() == (detect_run["out"] / "scores.jsonl").read_text()


def test_sharded_refuses_parts_of_other_settings(detect_run, sharded_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(sharded_run["out"], out)
    for f in ("scores.jsonl", "report.json", "roc.png"):
        (out / f).unlink()
    before = (out / "parts" / "shard-00000.jsonl").read_text()
    capsys.readouterr()
    assert main(_argv_with_out(detect_run, out, "--shard-size", str(SHARD), "--seed", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shards of a detect run with other settings" in err
    assert (out / "parts" / "shard-00000.jsonl").read_text() == before


@pytest.mark.parametrize("size", ["12", "0"])
def test_error_shard_size_not_a_multiple_of_batch(detect_run, tmp_path, capsys, size):
    assert main(_argv_with_out(detect_run, tmp_path / "out", "--shard-size", size)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--shard-size" in err and "--batch-size 8" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_two_processes_equal_one(detect_run, tmp_path):
    """``accelerate launch`` of 2 CPU processes (gloo, as tests/audit/test_distributed.py): each
    scores its shards, the main process merges; the floats equal the one-process run's, which ran
    at 1 torch thread (module fixture), as each launched process does (OMP_NUM_THREADS=1)."""
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    from memreg.testing import accelerate_launch

    log = accelerate_launch(2, ["-m", "memreg.cli", *_argv_with_out(detect_run, out, "--shard-size", str(SHARD))],
                            29543, repo)
    assert "process 0/2: 2 shard(s) scored" in log and "process 1/2: 2 shard(s) scored" in log
    assert [h["rank"] for h in _part_headers(out)] == [0, 1, 0, 1]
    assert (out / "scores.jsonl").read_text() == (detect_run["out"] / "scores.jsonl").read_text()
    r = json.loads((out / "report.json").read_text())
    assert r["metrics"] == _report(detect_run)["metrics"] and r["timing"]["processes"] == 2
