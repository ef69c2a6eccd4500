"""SDXL base 1.0 at its published architecture (random weights, 64 px, CPU): the pipeline loads as a
downloaded checkpoint does, the UNet runs with its ``text_time`` added conditioning, diffusers'
pipeline generates, and memreg trains (2 steps, the guard at its defaults: LoRA, and full
fine-tuning), resumes exactly, detects, generates with score mitigation, and its LoRA reloads into
diffusers' pipeline.

Parameter counts are the published model's: UNet 2,567,463,684; CLIP ViT-L/14 text 123,060,480;
OpenCLIP ViT-bigG/14 text with its projection 694,659,840; VAE 83,653,863. Full fine-tuning of that
UNet with AdamW needs about 41 GB (16 bytes a parameter) and does not fit a 24 GiB machine, so full
fine-tuning runs on the builder's ``blocks=1``: the same configuration with one transformer block
per attention (a 0.64B-parameter UNet: 10 GB of weights, gradients and AdamW moments; a run peaks
at 14 GB with the frozen text encoders and VAE), every layer type and width of the real one otherwise.

Order matters for memory: each memreg run loads its own copy of the model (the full SDXL pipeline
is 13 GB in fp32), so the tests through memreg come first and diffusers' pipeline (``pipe``, held
until the module ends) is loaded only after them."""

from __future__ import annotations

import gc
import json
import math
import shutil

import pytest
import torch

from memreg import log_tags as tags

from .conftest import RESOLUTION, build_line, cached_pipeline

PUBLISHED = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
             "vae": 83_653_863}
# blocks=1 drops 1 of the 2 transformer blocks of each 640-wide attention (2 down, 3 up) and 9 of the 10 of
# each 1280-wide one (2 down, 3 up, mid). A block of width C (cross-attention 2048) holds 18 C^2 + 4113 C
# parameters in 20 tensors (self-attention 4 C^2 + C; cross-attention 2 C^2 + 4097 C; GEGLU feed-forward
# 12 C^2 + 9 C; three LayerNorms 6 C): 10,005,120 at 640, 34,755,840 at 1280.
B1_UNET = 2_567_463_684 - 5 * 10_005_120 - 54 * 34_755_840      # 640,622,724
B1_TENSORS = 1680 - (5 + 54) * 20                               # 500 of the published UNet's 1680

pytestmark = pytest.mark.slow


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def sdxl():
    path = cached_pipeline("sdxl")
    print(build_line(path))
    return path


@pytest.fixture(scope="module")
def sdxl_b1():
    """SDXL base with one transformer block per attention (the full fine-tuning tests' model)."""
    path = cached_pipeline("sdxl", blocks=1)
    print(build_line(path))
    return path


def differing_tensors(a, b) -> list[str]:
    """The tensor names whose values differ between two diffusers UNet dirs (read one tensor at a
    time: a full UNet pair would double the test's memory)."""
    from safetensors import safe_open

    name = "diffusion_pytorch_model.safetensors"
    with safe_open(str(a / name), "pt") as fa, safe_open(str(b / name), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        return [k for k in fa.keys() if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]


# ---------------------------------------------------------------------------- through memreg
# (first in the file: each run loads its own copy of the model, so no pipeline may be held meanwhile)

@pytest.fixture(scope="module")
def sdxl_lora(sdxl, arch_data, tmp_path_factory):
    from .test_sd import train

    out = tmp_path_factory.mktemp("sdxl_lora") / "run"
    return out, train(sdxl, arch_data, out, "lora", checkpointing_steps=1)


def test_sdxl_lora_with_the_guard_through_memreg(sdxl_lora):
    from .test_sd import lora_file

    out, run = sdxl_lora
    assert run["global_step"] == 2 and all(math.isfinite(lg[tags.TRAIN_LOSS_MSE]) for lg in run["logs"])
    assert [lg["step"] for lg in run["logs"] if tags.GUARD_THRESHOLD in lg] == [1]
    weights = lora_file(out)
    assert weights and all(k.startswith("unet.") for k in weights)
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)


def test_sdxl_lora_resumes_exactly(sdxl_lora, sdxl, arch_data, tmp_path):
    """Resumed from the uninterrupted run's step-1 checkpoint, the run trains step 2 only and writes
    the uninterrupted run's LoRA bit for bit (weights, AdamW moments, RNG and guard state restored)."""
    from .test_sd import check_lora_resumes_exactly

    check_lora_resumes_exactly(sdxl, arch_data, sdxl_lora[0], tmp_path / "resumed")


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


def test_sdxl_generate_with_score_mitigation(sdxl, tmp_path):
    """As SD's (test_sd.py): the flagged prompts' embedding steps carry SDXL's pooled embedding and
    time ids along."""
    from .test_sd import check_score_mitigation

    check_score_mitigation(sdxl, tmp_path)


# ---------------------------------------------------------------------------- full fine-tuning (blocks=1)

@pytest.fixture(scope="module")
def sdxl_full(sdxl_b1, arch_data, tmp_path_factory):
    """2 uninterrupted steps of full fine-tuning, the guard at its defaults; its outputs (a 6 GB
    pipeline dir) are removed when the module ends."""
    from .test_sd import train

    out = tmp_path_factory.mktemp("sdxl_full") / "run"
    yield out, train(sdxl_b1, arch_data, out, "full", checkpointing_steps=100000, learning_rate=1e-4)
    shutil.rmtree(out, ignore_errors=True)


def test_sdxl_full_fine_tuning_with_the_guard(sdxl_full, sdxl_b1):
    from memreg.arch.build import build_info

    out, run = sdxl_full
    assert run["global_step"] == 2 and all(math.isfinite(lg[tags.TRAIN_LOSS_MSE]) for lg in run["logs"])
    assert [lg["step"] for lg in run["logs"] if tags.GUARD_THRESHOLD in lg] == [1]
    assert build_info(sdxl_b1)["params"]["unet"] == B1_UNET
    assert json.loads((out / "unet" / "config.json").read_text())["transformer_layers_per_block"] == [1, 1, 1]
    changed = differing_tensors(out / "unet", sdxl_b1 / "unet")
    assert len(changed) > 0.9 * B1_TENSORS   # AdamW moves every parameter with a gradient


def test_sdxl_full_fine_tuning_resumes_exactly(sdxl_full, sdxl_b1, arch_data, tmp_path):
    """Stopped after step 1 (its checkpoint written, no final outputs) and resumed from ``latest``,
    the run trains step 2 only and ends with the uninterrupted run's UNet bit for bit."""
    from memreg.training.checkpoint import has_final_outputs, list_checkpoints

    from .test_sd import train

    full, _ = sdxl_full
    out = tmp_path / "run"
    try:
        first = train(sdxl_b1, arch_data, out, "full", checkpointing_steps=1, learning_rate=1e-4, stop_at_step=1)
        assert first["global_step"] == 1 and [d.name for d in list_checkpoints(out)] == ["checkpoint-1"]
        assert has_final_outputs(out) is None
        res = train(sdxl_b1, arch_data, out, "full", checkpointing_steps=100000, learning_rate=1e-4,
                    resume_from_checkpoint="latest")
        assert res["global_step"] == 2 and [lg["step"] for lg in res["logs"]] == [2]
        assert differing_tensors(out / "unet", full / "unet") == []
    finally:
        shutil.rmtree(out, ignore_errors=True)   # a 7.7 GB checkpoint and a 6 GB pipeline


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
