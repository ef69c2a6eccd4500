"""memreg/score.py against hand computations with explicit, separate UNet calls."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memreg.score import (
    AnisotropyScore,
    channel_alignment,
    default_timesteps,
    pure_noise_latents,
    to_epsilon,
    wen_multistep_norm,
)

PROMPTS = ["a red circle on a blue background", "a photo of a dog", "the moon at night"]


def _embeds(components, prompts):
    tok, te = components.tokenizer, components.text_encoder
    with torch.no_grad():
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        cond = te(ids)[0]
        ids_u = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        uncond = te(ids_u)[0]
    return cond, uncond


def _reference(components, x, cond, uncond, t_hi, t_lo, g1, g2):
    """The paper's definition, written out: four separate UNet calls, explicit conversions."""
    unet, ab = components.unet, components.scheduler.alphas_cumprod
    pred = components.scheduler.config.prediction_type
    b = x.shape[0]

    def eps(t, emb):
        out = unet(x, torch.full((b,), t), encoder_hidden_states=emb.expand(b, -1, -1)).sample
        if pred == "v_prediction":
            return math.sqrt(ab[t]) * out + math.sqrt(1 - ab[t]) * x
        return out

    norm = (eps(t_hi, cond) - eps(t_hi, uncond)).flatten(1).norm(dim=1)
    e_u = eps(t_lo, uncond)
    guidance = eps(t_lo, cond) - e_u
    align = F.cosine_similarity(e_u, guidance, dim=1).mean(dim=(1, 2))
    return norm, align, g1 * norm + g2 * align


def test_default_timesteps_are_sd_ddim_981_and_41(eps_components):
    assert default_timesteps(eps_components.scheduler.config) == (981, 41)


@pytest.mark.parametrize("which", ["eps", "v"])
def test_score_matches_separate_unet_calls(which, eps_components, v_components):
    comps = eps_components if which == "eps" else v_components
    cond, uncond = _embeds(comps, PROMPTS)
    x = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(3))
    scorer = AnisotropyScore(comps.unet, comps.scheduler, g1=1.0, g2=2.0)
    with torch.no_grad():
        out = scorer(x, cond, uncond)
        norm, align, score = _reference(comps, x, cond, uncond, 981, 41, 1.0, 2.0)
    for got in (out.norm, out.align, out.score):
        assert got.dtype == torch.float32 and got.shape == (len(PROMPTS),)
    torch.testing.assert_close(out.norm, norm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.align, align, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.score, score, rtol=1e-4, atol=1e-5)
    assert (out.norm > 0).all()


def test_custom_timesteps_and_preset(eps_components):
    cond, uncond = _embeds(eps_components, PROMPTS[:2])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    scorer = AnisotropyScore(eps_components.unet, eps_components.scheduler, t_hi=900, t_lo=100, preset="sd2")
    assert (scorer.g1, scorer.g2) == (1.0, 0.1)
    with torch.no_grad():
        out = scorer(x, cond, uncond)
        norm, align, score = _reference(eps_components, x, cond, uncond, 900, 100, 1.0, 0.1)
    torch.testing.assert_close(out.score, score, rtol=1e-4, atol=1e-5)


def test_v_prediction_score_space_follows_released_sd2_code(v_components):
    """space="score": ||(sqrt(ab) v_c - x)/(1-ab) - (sqrt(ab) v_u - x)/(1-ab)||, per the seed."""
    comps = v_components
    cond, uncond = _embeds(comps, PROMPTS[:2])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    scorer = AnisotropyScore(comps.unet, comps.scheduler, space="score")
    ab = float(comps.scheduler.alphas_cumprod[981])
    with torch.no_grad():
        out = scorer(x, cond, uncond)
        v_c = comps.unet(x, torch.full((2,), 981), encoder_hidden_states=cond).sample
        v_u = comps.unet(x, torch.full((2,), 981), encoder_hidden_states=uncond.expand(2, -1, -1)).sample
    s_c = (math.sqrt(ab) * v_c - x) / (1 - ab)
    s_u = (math.sqrt(ab) * v_u - x) / (1 - ab)
    torch.testing.assert_close(out.norm, (s_c - s_u).flatten(1).norm(dim=1), rtol=1e-4, atol=1e-5)


def test_to_epsilon_conversions_by_hand():
    x = torch.tensor([[[[2.0]]]])
    ab = torch.tensor([0.64])  # alpha = 0.8, sigma = 0.6
    v = torch.tensor([[[[1.0]]]])
    assert to_epsilon(v, x, ab, "v_prediction").item() == pytest.approx(0.8 * 1.0 + 0.6 * 2.0)
    x0 = torch.tensor([[[[1.0]]]])
    assert to_epsilon(x0, x, ab, "sample").item() == pytest.approx((2.0 - 0.8 * 1.0) / 0.6)
    assert to_epsilon(v, x, ab, "epsilon") is v


def test_channel_alignment_by_hand_and_zero_guidance():
    u = torch.zeros(1, 2, 1, 2)
    g = torch.zeros(1, 2, 1, 2)
    u[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    g[0, :, 0, 0] = torch.tensor([1.0, 1.0])  # cos 45 deg
    u[0, :, 0, 1] = torch.tensor([0.0, 2.0])
    g[0, :, 0, 1] = torch.tensor([0.0, -3.0])  # cos = -1
    expected = (1 / np.sqrt(2) - 1.0) / 2
    assert channel_alignment(u, g).item() == pytest.approx(expected, rel=1e-6)
    zero = channel_alignment(u, torch.zeros_like(g))
    assert zero.item() == 0.0
    g.requires_grad_(True)
    channel_alignment(u, g * torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)).sum().backward()
    assert torch.isfinite(g.grad).all()


def test_cond_equal_uncond_gives_zero(eps_components):
    _, uncond = _embeds(eps_components, PROMPTS[:1])
    x = pure_noise_latents(eps_components.unet, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = AnisotropyScore(eps_components.unet, eps_components.scheduler)(x, uncond.expand(2, -1, -1), uncond)
    assert torch.equal(out.norm, torch.zeros(2)) and torch.equal(out.align, torch.zeros(2))


def test_batch_equals_single_calls_and_chunking(eps_components):
    cond, uncond = _embeds(eps_components, PROMPTS)
    x = pure_noise_latents(eps_components.unet, 3, torch.Generator().manual_seed(1))
    scorer = AnisotropyScore(eps_components.unet, eps_components.scheduler)
    chunked = AnisotropyScore(eps_components.unet, eps_components.scheduler, chunk_size=5)
    with torch.no_grad():
        batched = scorer(x, cond, uncond).score
        singles = torch.cat([scorer(x[i:i + 1], cond[i:i + 1], uncond).score for i in range(3)])
        pieces = chunked(x, cond, uncond).score
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched, pieces, rtol=1e-4, atol=1e-5)


def test_generator_makes_noise_deterministic(eps_components):
    unet = eps_components.unet
    a = pure_noise_latents(unet, 2, torch.Generator().manual_seed(7))
    b = pure_noise_latents(unet, 2, torch.Generator().manual_seed(7))
    c = pure_noise_latents(unet, 2, torch.Generator().manual_seed(8))
    assert a.shape == (2, 4, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    cond, uncond = _embeds(eps_components, PROMPTS[:2])
    scorer = AnisotropyScore(unet, eps_components.scheduler)
    with torch.no_grad():
        assert torch.equal(scorer(a, cond, uncond).score, scorer(b, cond, uncond).score)


def test_gradients_reach_lora_parameters(tiny_sd_eps):
    from peft import LoraConfig

    from memreg.models import load_components

    comps = load_components(str(tiny_sd_eps))
    unet = comps.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = [p for n, p in unet.named_parameters() if "lora" in n]
    assert lora and all(p.requires_grad for p in lora)
    cond, uncond = _embeds(comps, PROMPTS[:2])
    x = pure_noise_latents(unet, 2, torch.Generator().manual_seed(2))
    out = AnisotropyScore(unet, comps.scheduler)(x, cond, uncond)
    out.score.sum().backward()
    grads = [p.grad for p in lora]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_autocast_bf16_returns_fp32(eps_components):
    cond, uncond = _embeds(eps_components, PROMPTS[:2])
    x = pure_noise_latents(eps_components.unet, 2, torch.Generator().manual_seed(3))
    scorer = AnisotropyScore(eps_components.unet, eps_components.scheduler)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = scorer(x, cond, uncond)
    with torch.no_grad():
        ref = scorer(x, cond, uncond)
    assert out.norm.dtype == out.align.dtype == out.score.dtype == torch.float32
    torch.testing.assert_close(out.norm, ref.norm, rtol=0.1, atol=0.05)


def test_bad_arguments_are_named(eps_components):
    with pytest.raises(ValueError, match="t_hi"):
        AnisotropyScore(eps_components.unet, eps_components.scheduler, t_hi=1000)
    with pytest.raises(ValueError, match="preset"):
        AnisotropyScore(eps_components.unet, eps_components.scheduler, preset="sd3")
    with pytest.raises(ValueError, match="space"):
        AnisotropyScore(eps_components.unet, eps_components.scheduler, space="x0")


def test_wen_single_step_is_norm_at_first_ddim_step(eps_components):
    cond, uncond = _embeds(eps_components, PROMPTS[:2])
    x = pure_noise_latents(eps_components.unet, 2, torch.Generator().manual_seed(9))
    unet = eps_components.unet
    with torch.no_grad():
        wen = wen_multistep_norm(unet, eps_components.scheduler, x, cond, uncond, steps=1)
        e_c = unet(x, torch.full((2,), 981), encoder_hidden_states=cond).sample
        e_u = unet(x, torch.full((2,), 981), encoder_hidden_states=uncond.expand(2, -1, -1)).sample
    torch.testing.assert_close(wen, (e_c - e_u).flatten(1).norm(dim=1), rtol=1e-4, atol=1e-5)


def test_wen_multistep_follows_a_cfg_ddim_run(eps_components):
    """Two DDIM steps (981 -> 961 -> ...) with CFG 7.5, written out by hand."""
    cond, uncond = _embeds(eps_components, PROMPTS[:1])
    x = pure_noise_latents(eps_components.unet, 1, torch.Generator().manual_seed(10))
    unet, ab = eps_components.unet, eps_components.scheduler.alphas_cumprod
    norms, xt = [], x.clone()
    with torch.no_grad():
        got = wen_multistep_norm(unet, eps_components.scheduler, x, cond, uncond, steps=2)
        for t, t_prev in ((981, 961), (961, 941)):
            e_c = unet(xt, torch.tensor([t]), encoder_hidden_states=cond).sample
            e_u = unet(xt, torch.tensor([t]), encoder_hidden_states=uncond).sample
            norms.append((e_c - e_u).flatten(1).norm(dim=1))
            e = e_u + 7.5 * (e_c - e_u)
            x0 = (xt - math.sqrt(1 - ab[t]) * e) / math.sqrt(ab[t])
            xt = math.sqrt(ab[t_prev]) * x0 + math.sqrt(1 - ab[t_prev]) * e
    torch.testing.assert_close(got, (norms[0] + norms[1]) / 2, rtol=1e-4, atol=1e-5)

