"""memreg.training.checkpoint.save_lora: a LoRA on convolutions and feed-forward layers too loads back
exactly through diffusers' ``load_lora_weights`` (the mixed-format file dropped its attention weights)."""

import pytest
import torch


@pytest.mark.parametrize("targets", [["to_k", "to_q", "to_v", "to_out.0"],
                                     ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2"]])
def test_saved_lora_reloads_exactly(tiny_sd_eps, tmp_path, targets):
    from peft import LoraConfig

    from memreg.generation import build_pipeline
    from memreg.models import load_components
    from memreg.training.checkpoint import save_lora

    comps = load_components(str(tiny_sd_eps))
    unet = comps.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # B starts at zero: give every adapter a visible effect
            p.data.copy_(0.1 * torch.randn(p.shape, generator=gen))
    x = torch.randn(2, unet.config.in_channels, 32, 32, generator=gen)
    t = torch.tensor([500, 900])
    emb = torch.randn(2, 8, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        trained = unet(x, t, encoder_hidden_states=emb).sample
    save_lora(tmp_path / "lora", unet, kohya=False)

    pipe = build_pipeline(load_components(str(tiny_sd_eps)))
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=emb).sample
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        loaded = pipe.unet(x, t, encoder_hidden_states=emb).sample
    assert (trained - base).abs().max() > 1e-3          # the adapters matter ...
    assert torch.equal(loaded, trained)                 # ... and all of them came back
