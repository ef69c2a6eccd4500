"""The guard protocol (memreg/guards/base.py, registry.py): registry, fused-input helpers, base reference."""

from __future__ import annotations

import pytest
import torch

import memreg.guards as guards
from memreg.guards import ExtraInputs, GuardBatch, GuardContext, NoGuard, build_guard, concat_inputs, split_output


def test_public_api_and_registry():
    assert set(guards.GUARDS) == {"none", "anisotropy_gate", "wen_filter", "caption_noise", "agc"}
    for name in guards.GUARDS:
        assert guards.guard_class(name).name == name
    assert guards.guard_class("penalty") is guards.guard_class("anisotropy_gate")   # the old name still works
    with pytest.raises(ValueError, match="unknown guard type 'nope'"):
        guards.guard_class("nope")
    with pytest.raises(Exception, match="guard.agc"):
        guards.guard_config({"type": "agc", "agc": {"decay": 2.0}})
    assert guards.guard_config({"type": "agc", "agc.mem_ratio": 1.5}).agc.mem_ratio == 1.5


def test_concat_and_split_put_the_extra_inputs_after_the_batch():
    base = (torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]), torch.zeros(2, 3, 5))
    extra = ExtraInputs(torch.ones(3, 4, 8, 8), torch.tensor([7, 8, 9]), torch.ones(3, 3, 5))
    s, t, e = concat_inputs(base, extra)
    assert s.shape[0] == 5 and t.tolist() == [1, 2, 7, 8, 9] and e[2:].eq(1).all() and e[:2].eq(0).all()
    assert concat_inputs(base, None) is base
    pred, out = split_output(torch.arange(5.0), 2)
    assert pred.tolist() == [0.0, 1.0] and out.tolist() == [2.0, 3.0, 4.0]
    assert split_output(torch.arange(2.0), 2)[1] is None


def test_no_guard_is_the_plain_mean(eps_components):
    c = eps_components
    ctx = GuardContext.for_models(c.unet, c.scheduler, c.tokenizer, c.text_encoder, (4, 16, 16))
    g = build_guard({"type": "none"}, ctx)
    assert isinstance(g, NoGuard) and g.extra_inputs(0, torch.zeros(1), None) is None
    per = torch.tensor([1.0, 2.0, 6.0])
    out = g.loss(GuardBatch(0, None, None, None, None, per))
    assert out.loss.item() == 3.0 and g.state_dict() == {}


def test_reference_unet_disables_lora_adapters(tiny_sd_eps):
    from peft import LoraConfig

    from memreg.models import load_components

    c = load_components(str(tiny_sd_eps), with_vae=False)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    emb = torch.randn(1, 77, c.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = c.unet(x, t, encoder_hidden_states=emb).sample
    c.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    for n, p in c.unet.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(2))
    ctx = GuardContext(unet=c.unet, noise_scheduler=c.scheduler, encode=None, uncond=None, latent_shape=(4, 16, 16))
    with torch.no_grad():
        tuned = ctx.run_unet(x, t, emb)
        with ctx.reference_unet() as ref:
            reference = ctx.run_unet(x, t, emb, unet=ref)
        again = ctx.run_unet(x, t, emb)
    assert not torch.allclose(tuned, base, atol=1e-4)
    assert torch.equal(reference, base) and torch.equal(again, tuned)
    plain = GuardContext(unet=load_components(str(tiny_sd_eps), with_vae=False).unet, noise_scheduler=c.scheduler,
                         encode=None, uncond=None, latent_shape=(4, 16, 16))
    with pytest.raises(NotImplementedError, match="frozen copy|GuardContext.reference"):
        with plain.reference_unet():
            pass
