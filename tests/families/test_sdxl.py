"""memreg/families/sdxl.py on the tiny SDXL pipeline: prompt encoding, the empty prompt, time ids,
the score and the guard's fused forward, against diffusers' own pipeline and direct UNet calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from memreg.families import Conditioning, family_of, prompt_encoder
from memreg.families.sdxl import SDXLPromptEncoder, flipped_crop_left, time_ids
from memreg.image_ops import preprocess_with_crop
from memreg.score import make_scorer

PROMPTS = ["a red circle", "a blue square and a green triangle"]


def _unet(comps, x, t, embeds, pooled, ids):
    return comps.unet(x, torch.full((x.shape[0],), t), encoder_hidden_states=embeds,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


def test_encoder_matches_the_diffusers_pipeline(sdxl_components):
    family = family_of(sdxl_components)
    pipe = family.build_pipeline(sdxl_components)
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True)
    enc = prompt_encoder(sdxl_components).encode(PROMPTS)
    assert isinstance(enc.embeds, Conditioning) and enc.truncated == [False, False]
    assert enc.embeds.shape == (2, 77, 64)                      # 32 + 32 hidden sizes concatenated
    assert torch.equal(enc.embeds.embeds, pe) and torch.equal(enc.embeds.added["text_embeds"], pooled)
    # SDXL's force_zeros_for_empty_prompt: the pipeline's own negative conditioning is zeros
    assert not npe.any() and not npooled.any()


def test_empty_prompt_is_zeros_with_force_zeros_and_encoded_otherwise(sdxl_components):
    u = prompt_encoder(sdxl_components).uncond()
    assert u.shape == (1, 77, 64) and not u.embeds.any() and u.added["text_embeds"].shape == (1, 32)
    assert not u.added["text_embeds"].any()
    assert u.added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]   # 16 latent px x VAE factor 2
    enc = SDXLPromptEncoder(sdxl_components.tokenizers, sdxl_components.text_encoders, image_size=48,
                            force_zeros_for_empty_prompt=False)
    u2 = enc.uncond()
    blank = enc.encode([""]).embeds
    assert u2.embeds.abs().sum() > 0 and torch.equal(u2.embeds, blank.embeds)
    assert u2.added["time_ids"].tolist() == [[48.0, 48.0, 0.0, 0.0, 48.0, 48.0]]


def test_training_time_ids_for_a_known_crop():
    # a 40 x 48 (w x h) image at resolution 32: the shorter side 40 -> 32, the other int(32 * 48 / 40) = 38;
    # centre crop top = round((38 - 32) / 2) = 3, left = 0
    im = Image.fromarray(np.zeros((48, 40, 3), dtype=np.uint8))
    pixels, original, crop = preprocess_with_crop(im, 32, True, False)
    assert pixels.shape == (3, 32, 32) and original == (48, 40) and crop == (3, 0)
    assert time_ids(original, crop, (32, 32)) == [48, 40, 3, 0, 32, 32]
    # flipped: diffusers' SDXL scripts record resolution - left (the cropped image's width minus x1)
    assert flipped_crop_left(0, 32) == 32 and flipped_crop_left(5, 32) == 27


def test_training_conditioning_takes_each_rows_size_and_crop(sdxl_components):
    family = family_of(sdxl_components)
    cond = prompt_encoder(sdxl_components, image_size=32)(PROMPTS)
    batch = {"original_size": torch.tensor([[48, 40], [32, 64]]), "crop_top_left": torch.tensor([[3, 0], [0, 32]])}
    out = family.training_conditioning(cond, batch, 32)
    assert out.added["time_ids"].tolist() == [[48, 40, 3, 0, 32, 32], [32, 64, 0, 32, 32, 32]]
    assert out.embeds is cond.embeds and out.added["text_embeds"] is cond.added["text_embeds"]
    assert family.training_conditioning(cond, {}, 32) is cond        # no sizes: the encoder's defaults


def test_score_norm_equals_direct_unet_calls(sdxl_components):
    comps = sdxl_components
    scorer = make_scorer(comps.unet, comps.scheduler)
    assert (scorer.g1, scorer.g2) == (1.0, 2.0) and scorer.t_hi == 981   # the sdxl preset: SD1.x's weights
    enc = prompt_encoder(comps)
    cond, uncond = enc.encode(PROMPTS).embeds, enc.uncond()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = scorer(x, cond, uncond)
        ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).expand(2, 6)
        e_c = _unet(comps, x, 981, cond.embeds, cond.added["text_embeds"], ids)
        e_u = _unet(comps, x, 981, torch.zeros(2, 77, 64), torch.zeros(2, 32), ids)
    expected = torch.linalg.vector_norm((e_c - e_u).flatten(1), dim=1)
    assert expected.min() > 0
    torch.testing.assert_close(out.norm, expected, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(out.align).all() and (out.align.abs() <= 1).all()


def test_pooled_embedding_and_time_ids_reach_the_unet(sdxl_components):
    """The score changes when only the added conditioning changes (it is not dropped on the way)."""
    comps = sdxl_components
    scorer = make_scorer(comps.unet, comps.scheduler)
    enc = prompt_encoder(comps)
    cond, uncond = enc.encode(PROMPTS).embeds, enc.uncond()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    other = Conditioning(cond.embeds, {"text_embeds": cond.added["text_embeds"] * 0,
                                       "time_ids": cond.added["time_ids"]})
    with torch.no_grad():
        a, b = scorer(x, cond, uncond).norm, scorer(x, other, uncond).norm
    assert (a - b).abs().min() > 1e-6


def test_guard_probes_fuse_into_the_training_forward(sdxl_components):
    """The gate's probes appended to an SDXL training batch give the same outputs as separate calls."""
    from memreg.guards import GuardContext, build_guard, concat_inputs, split_output

    comps = sdxl_components
    enc = prompt_encoder(comps, image_size=32)
    ctx = GuardContext.for_models(comps.unet, comps.scheduler, comps.tokenizer, comps.text_encoder, (4, 16, 16),
                                  encoder=enc, train_captions=PROMPTS * 4)
    guard = build_guard({"type": "anisotropy_gate", "penalty": "score", "weight": 1.0, "every_n_steps": 1, "probes_per_step": 2,
                         "reference": "none", "gate": False, "tau": 0.0, "zscore": "none", "calibration_prompts": 4,
                         "calibration_seeds": 1}, ctx)
    guard.calibrate()
    cond = family_of(comps).training_conditioning(enc(PROMPTS), {"original_size": torch.tensor([[48, 40], [32, 32]]),
                                                                 "crop_top_left": torch.tensor([[3, 0], [0, 0]])}, 32)
    noisy = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([100, 700])
    extra = guard.extra_inputs(0, enc(PROMPTS), PROMPTS)
    assert extra is not None and isinstance(extra.embeds, Conditioning) and extra.embeds.shape[0] == extra.sample.shape[0]
    sample, tt, c = concat_inputs((noisy, t, cond), extra)
    with torch.no_grad():
        fused = comps.unet(sample, tt, encoder_hidden_states=c.embeds, added_cond_kwargs=dict(c.added)).sample
        alone = comps.unet(noisy, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=dict(cond.added)).sample
        probe = comps.unet(extra.sample, extra.timesteps, encoder_hidden_states=extra.embeds.embeds,
                           added_cond_kwargs=dict(extra.embeds.added)).sample
    pred, extra_out = split_output(fused, 2)
    torch.testing.assert_close(pred, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(extra_out, probe, rtol=1e-4, atol=1e-5)
    # the probes condition on the encoder's centred time ids, the training rows on their own
    assert extra.embeds.added["time_ids"][0].tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    assert c.added["time_ids"][0].tolist() == [48.0, 40.0, 3.0, 0.0, 32.0, 32.0]
