"""SD 1.5 and SD 2.1 at their published architectures (random weights, 64 px, CPU): the pipeline
loads as a downloaded checkpoint does, ``train/train.py`` runs 2 steps with the guard at its defaults
(LoRA and full fine-tuning) and resumes exactly, ``memreg detect`` scores as a hand computation
does, ``memreg generate --mitigate score`` runs, and a LoRA written by memreg reloads into diffusers'
pipeline with equal outputs.

Parameter counts are the published models' (SD 1.5 UNet 859,520,964 and SD 2.1 UNet 865,910,724
parameters; CLIP ViT-L/14 text 123,060,480; the OpenCLIP ViT-H/14 text tower without its last layer,
as SD 2.x uses it, 340,387,840; the VAE 83,653,863)."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import shutil

import pytest
import torch

from memreg import log_tags as tags
from memreg.testing import load_script

from .conftest import REPO, RESOLUTION, build_line, cached_pipeline

FAMILIES = ["sd15", "sd21"]
PUBLISHED = {  # family: (UNet params, text encoder params, cross-attention dim, prediction type)
    "sd15": (859_520_964, 123_060_480, 768, "epsilon"),
    "sd21": (865_910_724, 340_387_840, 1024, "v_prediction"),
}
VAE_PARAMS = 83_653_863
TRAIN = REPO / "train" / "train.py"
PRESET = {"sd15": ("sd1", 2.0), "sd21": ("sd2", 0.1)}


pytestmark = pytest.mark.slow

def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def arch(family):
    path = cached_pipeline(family)
    print(build_line(path))
    return path


def train(model, data, out, mode: str, steps: int = 2, **extra):
    """``train/train.py`` in-process (its ``main``, as ``python train/train.py ARGV`` runs it): the tiny
    CPU config at 64 px, batch 2, the guard at its defaults (``anisotropy_gate``, no guard key set)."""
    argv = ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--resolution", str(RESOLUTION),
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--mode", mode, "--report_to", "none",
            "--guard.type", "anisotropy_gate"]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    res = load_script(TRAIN).main(argv)
    summary = {"global_step": res.global_step, "logs": res.logs, "final_report": res.final_report}
    del res
    gc.collect()
    return summary


def lora_file(out):
    from safetensors.torch import load_file

    return load_file(str(out / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def lora_run(arch, arch_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, train(arch, arch_data, out, "lora", checkpointing_steps=1)


def run_cli(argv) -> tuple[int, str]:
    from memreg.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


# ---------------------------------------------------------------------------- the fixture itself

def test_pipeline_loads_as_a_downloaded_checkpoint(arch, family):
    from diffusers import StableDiffusionPipeline

    from memreg.models import load_components

    unet_n, text_n, cross, pred = PUBLISHED[family]
    comps = load_components(str(arch))
    assert n_params(comps.unet) == unet_n and n_params(comps.text_encoder) == text_n
    assert n_params(comps.vae) == VAE_PARAMS
    assert comps.unet.config.cross_attention_dim == cross == comps.text_encoder.config.hidden_size
    assert comps.prediction_type == pred
    assert comps.unet.config.sample_size == 8 and comps.vae.config.sample_size == RESOLUTION
    del comps
    pipe = StableDiffusionPipeline.from_pretrained(str(arch))
    assert type(pipe.scheduler).__name__ == {"sd15": "PNDMScheduler", "sd21": "DDIMScheduler"}[family]
    assert pipe.unet.config.use_linear_projection == (family == "sd21")
    assert bool(pipe.unet.config.upcast_attention) == (family == "sd21")
    del pipe
    gc.collect()


# ---------------------------------------------------------------------------- training

def test_lora_with_the_guard_trains_and_resumes_exactly(lora_run, arch, arch_data, tmp_path):
    out, run = lora_run
    assert run["global_step"] == 2
    assert all(math.isfinite(lg[tags.TRAIN_LOSS_MSE]) for lg in run["logs"])
    # the defaults probe from the first optimizer step (every_n_steps auto: every 32nd at batch 2): step 1 probed
    assert [lg["step"] for lg in run["logs"] if tags.GUARD_THRESHOLD in lg] == [1]
    check_lora_resumes_exactly(arch, arch_data, out, tmp_path / "resumed")


def check_lora_resumes_exactly(model, data, out, resumed):
    """Resumed from ``out``'s step-1 checkpoint into ``resumed``, the run trains step 2 only and
    writes ``out``'s LoRA bit for bit (weights, AdamW moments, RNG and guard state restored)."""
    res = train(model, data, resumed, "lora", resume_from_checkpoint=out / "checkpoint-1")
    assert res["global_step"] == 2 and [lg["step"] for lg in res["logs"]] == [2]
    a, b = lora_file(out), lora_file(resumed)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_full_fine_tuning_with_the_guard(arch, arch_data, tmp_path, family):
    from safetensors.torch import load_file

    out = tmp_path / "full"
    run = train(arch, arch_data, out, "full", checkpointing_steps=100000, learning_rate=1e-4)
    assert run["global_step"] == 2 and [lg["step"] for lg in run["logs"] if tags.GUARD_THRESHOLD in lg] == [1]
    trained = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(arch / "unet" / "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == base.keys() and len(trained) > 600
    changed = sum(not torch.equal(trained[k], base[k]) for k in base)
    assert changed > 0.9 * len(base)   # AdamW moves every parameter with a gradient
    del trained, base
    shutil.rmtree(out)                 # 4-5 GB of weights


# ---------------------------------------------------------------------------- commands

def test_detect_norm_matches_a_hand_computation(arch, family, tmp_path):
    """scores.jsonl's norm of a prompt = ||eps(x_T, 981, c) - eps(x_T, 981, "")||, computed here from
    diffusers' components directly (x_T: seed 0's N(0, I) latent, shared by all prompts)."""
    from diffusers import StableDiffusionPipeline

    mem, nonmem = tmp_path / "mem.txt", tmp_path / "nonmem.txt"
    mem.write_text("a red circle\na blue square\n")
    nonmem.write_text("a green tree\nthe old house\n")
    preset, g2 = PRESET[family]
    rc, out = run_cli(["detect", "--model", str(arch), "--mem", str(mem), "--nonmem", str(nonmem), "--out",
                       str(tmp_path / "out"), "--preset", preset, "--batch-size", "4", "--no-progress"])
    assert rc == 0, out
    rows = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle", "a blue square", "a green tree", "the old house"]
    for r in rows:
        assert r["score"] == pytest.approx(r["norm"] + g2 * r["align"], rel=1e-5, abs=1e-6)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["t_hi"] == 981 and report["prediction_type"] == PUBLISHED[family][3]

    pipe = StableDiffusionPipeline.from_pretrained(str(arch))
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    with torch.no_grad():
        ids = tok(["a red circle", ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        emb = te(ids.input_ids)[0]
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        out = unet(torch.cat([x, x]), 981, encoder_hidden_states=emb).sample
    if family == "sd21":   # v -> eps: eps = sqrt(abar) v + sqrt(1 - abar) x
        ab = pipe.scheduler.alphas_cumprod[981]
        out = ab.sqrt() * out + (1 - ab).sqrt() * x
    norm = (out[0] - out[1]).flatten().norm().item()
    assert rows[0]["norm"] == pytest.approx(norm, rel=1e-4)
    del pipe
    gc.collect()


def test_generate_with_score_mitigation(arch, tmp_path):
    check_score_mitigation(arch, tmp_path)


def check_score_mitigation(model, tmp_path):
    """``memreg generate --mitigate score`` on ``model``: tau from 4 ordinary prompts (median), the
    flagged prompts get at most one embedding step, every prompt gets its image at RESOLUTION."""
    from PIL import Image

    prompts, ordinary = tmp_path / "p.txt", tmp_path / "ordinary.txt"
    prompts.write_text("a red circle\nthe old house\n")
    ordinary.write_text("a green tree\ntwo cats on a table\nthe sea at sunset\na man with a book\n")
    out = tmp_path / "gen"
    rc, stdout = run_cli(["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                          "--mitigate", "score", "--calibrate", str(ordinary), "--tau-quantile", "0.5",
                          "--target-quantile", "0.0", "--steps", "2", "--max-steps", "1", "--draws", "1",
                          "--batch-size", "2", "--no-progress"])
    assert rc == 0, stdout
    rows = [json.loads(x) for x in (out / "mitigation.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle", "the old house"]
    for r in rows:
        assert r["flagged"] == (r["score_before"] > r["tau"])
        assert r["steps"] <= 1 and (r["steps"] == 0 or r["flagged"])
        assert Image.open(out / r["image"]).size == (RESOLUTION, RESOLUTION)


# ---------------------------------------------------------------------------- LoRA files

def test_lora_export_reloads_into_the_diffusers_pipeline_exactly(arch, lora_run, tmp_path):
    """A LoRA on attention, feed-forward and ResNet convolutions (every adapter non-zero) saved by
    memreg gives the same UNet output in diffusers' pipeline; the file train/train.py wrote loads into
    the pipeline, changes its UNet and the pipeline still generates."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from memreg.models import load_components
    from memreg.training.checkpoint import save_lora

    targets = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2"]
    unet = load_components(str(arch), with_vae=False).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.copy_(0.01 * torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([500, 900])
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        trained = unet(x, t, encoder_hidden_states=emb).sample
    save_lora(tmp_path / "lora", unet, kohya=False)
    del unet
    gc.collect()

    pipe = StableDiffusionPipeline.from_pretrained(str(arch))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=emb).sample
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        loaded = pipe.unet(x, t, encoder_hidden_states=emb).sample
    assert (trained - base).abs().max() > 1e-3
    assert torch.equal(loaded, trained)

    pipe.unload_lora_weights()
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, encoder_hidden_states=emb).sample, base)
    out, _ = lora_run
    pipe.load_lora_weights(str(out))
    with torch.no_grad():
        assert (pipe.unet(x, t, encoder_hidden_states=emb).sample - base).abs().max() > 0
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, RESOLUTION, RESOLUTION, 3) and torch.isfinite(torch.from_numpy(image)).all()
    del pipe
    gc.collect()
