"""train/train.py's loop on the tiny SDXL pipeline: LoRA (UNet, and both text encoders) and full
fine-tuning with the guard, resume, the outputs users load (diffusers LoRA, kohya, a pipeline dir)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .conftest import train_run

GATE = dict(guard__type="anisotropy_gate", guard__calibration_prompts=4, guard__calibration_seeds=1)


@pytest.fixture(scope="module")
def lora_gate_run(tiny_sdxl, sdxl_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl_runs") / "lora_gate"
    return out, train_run(tiny_sdxl, sdxl_data, out, steps=2, center_crop=False, **GATE)


def test_lora_with_the_gate_at_its_defaults(lora_gate_run, tiny_sdxl):
    out, res = lora_gate_run
    assert res.global_step == 2 and all(math.isfinite(log["train/loss_mse"]) for log in res.logs)
    assert res.guard.name == "anisotropy_gate"
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("unet.") for k in keys)


def test_lora_reloads_into_the_diffusers_sdxl_pipeline(lora_gate_run, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    from memreg.families import prompt_encoder
    from memreg.models import load_components

    out, _ = lora_gate_run
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    comps = load_components(str(tiny_sdxl))
    enc = prompt_encoder(comps)
    cond = enc.encode(["a red circle"]).embeds
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(encoder_hidden_states=cond.embeds, added_cond_kwargs=dict(cond.added))
    with torch.no_grad():
        base = pipe.unet(x, torch.tensor([500]), **kw).sample
        pipe.load_lora_weights(str(out))
        loaded = pipe.unet(x, torch.tensor([500]), **kw).sample
    assert (loaded - base).abs().max() > 1e-6          # the adapter is really in (not silently dropped)
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)


def test_penalty_weight_and_text_encoder_lora_on_both_encoders(tiny_sdxl, sdxl_data, tmp_path):
    """The anchor penalty at weight 1 (flagged rows' base predictions through SDXL's added
    conditioning rows) with LoRA on the UNet and both text encoders."""
    out = tmp_path / "te"
    res = train_run(tiny_sdxl, sdxl_data, out, steps=2, train_text_encoder=True, guard__weight=1.0,
                    guard__every_n_steps=1, guard__reference="none", guard__zscore="none", guard__tau=-1e9,
                    guard__term="norm", **GATE)
    assert res.global_step == 2 and "guard/penalty" in res.logs[-1]
    assert res.logs[-1]["guard/anchor_rows"] > 0     # every probe fired: its rows were anchored
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in keys), prefix
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors")).keys()
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) for k in kohya), prefix


def test_full_fine_tuning_writes_an_sdxl_pipeline_and_resumes_exactly(tiny_sdxl, sdxl_data, tmp_path):
    from memreg.families import detect_family

    kw = dict(mode="full", checkpointing_steps=1, **GATE)
    straight = tmp_path / "straight"
    train_run(tiny_sdxl, sdxl_data, straight, steps=2, **kw)
    assert detect_family(str(straight)).name == "sdxl"
    for sub in ("unet", "text_encoder", "text_encoder_2", "tokenizer_2", "vae"):
        assert (straight / sub).is_dir(), sub
    killed = tmp_path / "killed"
    train_run(tiny_sdxl, sdxl_data, killed, steps=2, stop_at_step=1, **kw)
    train_run(tiny_sdxl, sdxl_data, killed, steps=2, resume_from_checkpoint="latest", **kw)
    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(str(straight / "unet" / name)), load_file(str(killed / "unet" / name))
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(tiny_sdxl / "unet" / name))
    assert any(not torch.equal(a[k], base[k]) for k in a)


def test_separate_vae_flag(tiny_sdxl, sdxl_data, tmp_path):
    vae_dir = tmp_path / "vae"
    shutil.copytree(tiny_sdxl / "vae", vae_dir)
    res = train_run(tiny_sdxl, sdxl_data, tmp_path / "out", steps=1, pretrained_vae_model_name_or_path=str(vae_dir))
    assert res.global_step == 1


def test_cached_latents_carry_the_same_size_and_crop_as_the_images(tiny_sdxl, sdxl_data, sdxl_components):
    from memreg.training import data as D
    from memreg.training.config import TrainConfig

    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_sdxl), train_data_dir=str(sdxl_data), resolution=32)
    data = D.build_train_data(cfg, seed=0)
    cache = D.build_latent_cache(data, sdxl_components.vae, 32, True, "cpu", torch.float32)
    cached = D.TrainDataset(data, 32, True, True, seed=0, latent_cache=cache)
    plain = D.TrainDataset(data, 32, True, True, seed=0)
    for key in [(i, e) for i in data.train_idx for e in range(3)]:
        a, b = cached[key], plain[key]
        assert a["original_size"] == b["original_size"] == (48, 40)
        assert a["crop_top_left"] == b["crop_top_left"] and a["crop_top_left"] in ((3, 0), (3, 32))
    batch = D.collate([cached[(data.train_idx[0], 0)], cached[(data.train_idx[1], 0)]])
    assert batch["original_size"].tolist() == [[48, 40], [48, 40]]


def test_lora_with_cached_latents(tiny_sdxl, sdxl_data, tmp_path):
    res = train_run(tiny_sdxl, sdxl_data, tmp_path / "cached", steps=1, cache_latents=True, **GATE)
    assert res.global_step == 1 and math.isfinite(res.logs[-1]["train/loss_mse"])
