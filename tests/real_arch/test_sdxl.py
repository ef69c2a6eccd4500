"""SDXL base 1.0 at its published architecture (random weights, 64 px, CPU): the pipeline loads as a
downloaded checkpoint does, the UNet runs with its ``text_time`` added conditioning, diffusers'
pipeline generates, and memreg trains (LoRA, 2 steps, the guard at its defaults) and detects on it.

Parameter counts are the published model's: UNet 2,567,463,684; CLIP ViT-L/14 text 123,060,480;
OpenCLIP ViT-bigG/14 text with its projection 694,659,840; VAE 83,653,863. Full fine-tuning of that
UNet with AdamW needs about 41 GB (16 bytes a parameter) and does not fit this 24 GiB machine; the
builder's ``blocks=1`` gives the same configuration with one transformer block per attention (a
0.64B-parameter UNet) for it, not run here (the suite's time budget)."""

from __future__ import annotations

import gc
import importlib.util
import json
import math

import pytest
import torch

from memreg import log_tags as tags

from .conftest import RESOLUTION, build_line, cached_pipeline

PUBLISHED = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
             "vae": 83_653_863}
HAS_SDXL_FAMILY = importlib.util.find_spec("memreg.families") is not None and \
    importlib.util.find_spec("memreg.families.sdxl") is not None
needs_family = pytest.mark.skipif(not HAS_SDXL_FAMILY, reason="memreg.families.sdxl (issue #22 items 1-2) absent")


pytestmark = pytest.mark.slow

def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def sdxl():
    path = cached_pipeline("sdxl")
    print(build_line(path))
    return path


# ---------------------------------------------------------------------------- through memreg
# (first in the file: training loads its own 14 GB copy, so no pipeline may be held meanwhile)

@pytest.fixture(scope="module")
def sdxl_lora(sdxl, arch_data, tmp_path_factory):
    if not HAS_SDXL_FAMILY:
        pytest.skip("memreg.families.sdxl (issue #22 items 1-2) absent")
    from .test_sd import train

    out = tmp_path_factory.mktemp("sdxl_lora") / "run"
    return out, train(sdxl, arch_data, out, "lora", checkpointing_steps=100000)


@needs_family
def test_sdxl_lora_with_the_guard_through_memreg(sdxl_lora):
    from .test_sd import lora_file

    out, run = sdxl_lora
    assert run["global_step"] == 2 and all(math.isfinite(lg[tags.TRAIN_LOSS_MSE]) for lg in run["logs"])
    assert [lg["step"] for lg in run["logs"] if tags.GUARD_THRESHOLD in lg] == [1]
    weights = lora_file(out)
    assert weights and all(k.startswith("unet.") for k in weights)
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)


@needs_family
def test_sdxl_detect_through_memreg(sdxl, tmp_path):
    from .test_sd import run_cli

    mem, nonmem = tmp_path / "mem.txt", tmp_path / "nonmem.txt"
    mem.write_text("a red circle\na blue square\n")
    nonmem.write_text("a green tree\nthe old house\n")
    rc, out = run_cli(["detect", "--model", str(sdxl), "--mem", str(mem), "--nonmem", str(nonmem), "--out",
                       str(tmp_path / "out"), "--batch-size", "4", "--no-progress"])
    assert rc == 0, out
    rows = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle", "a blue square", "a green tree", "the old house"]
    assert all(r["norm"] > 0 and -1 <= r["align"] <= 1 for r in rows)


# ---------------------------------------------------------------------------- diffusers' pipeline

@pytest.fixture(scope="module")
def pipe(sdxl):
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(str(sdxl))
    p.set_progress_bar_config(disable=True)
    yield p
    del p
    gc.collect()


def test_sdxl_loads_as_a_downloaded_checkpoint(pipe):
    for name, n in PUBLISHED.items():
        assert n_params(getattr(pipe, name)) == n, name
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time" and cfg.cross_attention_dim == 2048
    # the added embedding takes the pooled bigG text embedding plus 6 time ids of 256 sinusoids each
    assert cfg.projection_class_embeddings_input_dim == pipe.text_encoder_2.config.projection_dim + 6 * 256
    assert list(cfg.transformer_layers_per_block) == [1, 2, 10]
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.default_sample_size * pipe.vae_scale_factor == RESOLUTION


def test_sdxl_unet_forward_uses_the_added_conditioning(pipe):
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
        assert emb.shape == (1, 77, 768 + 1280) and pooled.shape == (1, 1280)
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        # (original h, w, crop top, left, target h, w), as diffusers' SDXL pipeline builds them
        ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)

        def eps(text_embeds, time_ids):
            return pipe.unet(x, 981, encoder_hidden_states=emb,
                             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample

        out = eps(pooled, ids)
        assert out.shape == x.shape and torch.isfinite(out).all()
        cropped = ids.clone()
        cropped[0, 2:4] = 16
        assert (eps(pooled, cropped) - out).abs().max() > 1e-6
        assert (eps(torch.zeros_like(pooled), ids) - out).abs().max() > 1e-6


def test_sdxl_pipeline_generates(pipe):
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, RESOLUTION, RESOLUTION, 3) and torch.isfinite(torch.from_numpy(image)).all()




@needs_family
def test_sdxl_lora_from_memreg_loads_into_the_pipeline(pipe, sdxl_lora):
    out, _ = sdxl_lora
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
        cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        base = pipe.unet(x, 500, encoder_hidden_states=emb, added_cond_kwargs=cond).sample
        pipe.load_lora_weights(str(out))
        tuned = pipe.unet(x, 500, encoder_hidden_states=emb, added_cond_kwargs=cond).sample
        pipe.unload_lora_weights()
        again = pipe.unet(x, 500, encoder_hidden_states=emb, added_cond_kwargs=cond).sample
    assert (tuned - base).abs().max() > 0 and torch.equal(again, base)
