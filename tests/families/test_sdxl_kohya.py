"""SDXL kohya LoRA keys by the SGM UNet's module names (memreg.families.sdxl_kohya), as kohya's
sd-scripts (library/sdxl_model_util.py make_unet_conversion_map), A1111 and ComfyUI name them:
hand-computed keys of the published SDXL layout and of other configs, every module of the published
and the tiny UNet checked against diffusers' own single-file (LDM -> diffusers) converter, and the
kohya file memreg writes loaded by ``StableDiffusionXLPipeline.load_lora_weights`` with every key used."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import pytest
import torch

from memreg.families.base import ModelError

SDXL = dict(layers_per_block=2, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn")
TINY = dict(layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn")
# SD 1.x's block order (attention on the outer levels): its up level 0 has an upsampler but no attention
SD1_ORDER = dict(layers_per_block=2, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, mid_block_type="UNetMidBlock2DCrossAttn")
PER_LEVEL = dict(TINY, layers_per_block=[1, 2])

TQ = "transformer_blocks_0_attn1_to_q"

# (config, diffusers-named kohya module, SGM-named), worked out from the layout rules by hand:
# SDXL input_blocks: 0 conv_in; 1, 2 level 0 resnets; 3 its downsampler; 4, 5 level 1; 6 its
# downsampler; 7, 8 level 2. output_blocks: 0-2 up level 0 (upsampler in 2 at .2), 3-5 level 1, 6-8 level 2.
CASES = [
    (SDXL, f"down_blocks_1_attentions_0_{TQ}", f"input_blocks_4_1_{TQ}"),
    (SDXL, "down_blocks_1_attentions_1_transformer_blocks_1_attn2_to_out_0", "input_blocks_5_1_transformer_blocks_1_attn2_to_out_0"),
    (SDXL, "down_blocks_2_attentions_1_proj_in", "input_blocks_8_1_proj_in"),
    (SDXL, "down_blocks_0_resnets_1_conv2", "input_blocks_2_0_out_layers_3"),
    (SDXL, "down_blocks_1_resnets_0_conv1", "input_blocks_4_0_in_layers_2"),
    (SDXL, "down_blocks_1_resnets_0_conv_shortcut", "input_blocks_4_0_skip_connection"),
    (SDXL, "down_blocks_0_downsamplers_0_conv", "input_blocks_3_0_op"),
    (SDXL, "down_blocks_1_downsamplers_0_conv", "input_blocks_6_0_op"),
    (SDXL, "mid_block_resnets_0_time_emb_proj", "middle_block_0_emb_layers_1"),
    (SDXL, "mid_block_attentions_0_transformer_blocks_9_ff_net_0_proj", "middle_block_1_transformer_blocks_9_ff_net_0_proj"),
    (SDXL, "mid_block_resnets_1_conv1", "middle_block_2_in_layers_2"),
    (SDXL, f"up_blocks_0_attentions_2_{TQ}", f"output_blocks_2_1_{TQ}"),
    (SDXL, "up_blocks_0_upsamplers_0_conv", "output_blocks_2_2_conv"),
    (SDXL, "up_blocks_1_attentions_0_proj_out", "output_blocks_3_1_proj_out"),
    (SDXL, "up_blocks_1_upsamplers_0_conv", "output_blocks_5_2_conv"),
    (SDXL, "up_blocks_2_resnets_2_conv_shortcut", "output_blocks_8_0_skip_connection"),
    (SDXL, "conv_in", "input_blocks_0_0"),
    (SDXL, "conv_out", "out_2"),
    (SDXL, "time_embedding_linear_2", "time_embed_2"),
    (SDXL, "add_embedding_linear_1", "label_emb_0_0"),
    # tiny: input 1 level-0 resnet, 2 its downsampler, 3 level 1; output 0, 1 up level 0 (upsampler 1.2), 2, 3
    (TINY, f"down_blocks_1_attentions_0_{TQ}", f"input_blocks_3_1_{TQ}"),
    (TINY, "down_blocks_0_downsamplers_0_conv", "input_blocks_2_0_op"),
    (TINY, f"up_blocks_0_attentions_1_{TQ}", f"output_blocks_1_1_{TQ}"),
    (TINY, "up_blocks_0_upsamplers_0_conv", "output_blocks_1_2_conv"),
    (TINY, "up_blocks_1_resnets_1_conv1", "output_blocks_3_0_in_layers_2"),
    # SD 1.x order: the attention-less up level's upsampler sits at .1 (SD 1.5's output_blocks.2.1.conv)
    (SD1_ORDER, "up_blocks_0_upsamplers_0_conv", "output_blocks_2_1_conv"),
    (SD1_ORDER, "up_blocks_1_upsamplers_0_conv", "output_blocks_5_2_conv"),
    (SD1_ORDER, "down_blocks_3_resnets_1_conv1", "input_blocks_11_0_in_layers_2"),
    # layers per level (1, 2): input 1 res, 2 downsampler, 3-4 level 1; output 0-2 up level 0 (2 + 1 layers), 3-4
    (PER_LEVEL, "down_blocks_1_resnets_1_conv1", "input_blocks_4_0_in_layers_2"),
    (PER_LEVEL, "up_blocks_0_upsamplers_0_conv", "output_blocks_2_2_conv"),
    (PER_LEVEL, "up_blocks_1_resnets_1_conv2", "output_blocks_4_0_out_layers_3"),
]


@pytest.mark.parametrize("config, diffusers_name, sgm_name", CASES)
@pytest.mark.parametrize("suffix", [".lora_down.weight", ".lora_up.weight", ".alpha"])
def test_hand_computed_keys(config, diffusers_name, sgm_name, suffix):
    from memreg.families.sdxl_kohya import sgm_kohya_key

    assert sgm_kohya_key(f"lora_unet_{diffusers_name}{suffix}", config) == f"lora_unet_{sgm_name}{suffix}"


def test_text_encoder_keys_stay_and_the_family_hook_uses_the_layout():
    from memreg.families import family_named

    sdxl = family_named("sdxl")
    for key in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "lora_te2_text_model_encoder_layers_1_mlp_fc2.alpha"):
        assert sdxl.kohya_key(key, SDXL) == key
    assert sdxl.kohya_key(f"lora_unet_down_blocks_1_attentions_0_{TQ}.alpha", SDXL) == f"lora_unet_input_blocks_4_1_{TQ}.alpha"
    with pytest.raises(ValueError, match="config"):
        sdxl.kohya_key(f"lora_unet_down_blocks_1_attentions_0_{TQ}.alpha")
    # SD 1.x/2.x: kohya trains those on a diffusers-layout UNet, so their UNet keys keep diffusers' names
    key = f"lora_unet_down_blocks_1_attentions_0_{TQ}.alpha"
    assert family_named("sd1").kohya_key(key, SDXL) == key
    assert family_named("sd2").kohya_key("lora_te1_text_model_x.alpha") == "lora_te_text_model_x.alpha"


@pytest.mark.parametrize("key, cause", [
    ("lora_unet_down_blocks_2_downsamplers_0_conv.alpha", "no name"),     # the last level has no downsampler
    ("lora_unet_down_blocks_0_attentions_0_proj_in.alpha", "no name"),     # level 0 has no attention
    ("lora_unet_up_blocks_2_upsamplers_0_conv.alpha", "no name"),
    ("lora_unet_down_blocks_1_resnets_0_nonsense.alpha", "no name"),
    ("lora_unet_add_time_proj.alpha", "no name"),
])
def test_modules_the_layout_cannot_name_are_errors_naming_the_key(key, cause):
    from memreg.families.sdxl_kohya import sgm_kohya_key

    with pytest.raises(ModelError, match=cause) as e:
        sgm_kohya_key(key, SDXL)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_unknown_block_types_are_errors():
    from memreg.families.sdxl_kohya import sgm_kohya_key

    bad = dict(SDXL, down_block_types=["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
    with pytest.raises(ModelError, match="SimpleCrossAttnDownBlock2D"):
        sgm_kohya_key(f"lora_unet_down_blocks_1_attentions_0_{TQ}.alpha", bad)


def unet_param_names(config: dict) -> list[str]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():   # names only: the published UNet's 2.6B parameters are never allocated
        return list(UNet2DConditionModel.from_config(config).state_dict())


@pytest.mark.parametrize("which", ["published_sdxl", "tiny_sdxl"])
def test_every_unet_module_round_trips_through_diffusers_single_file_converter(which, tiny_sdxl):
    """All parameters, SGM-named by memreg, come back to their diffusers names through diffusers'
    ``convert_ldm_unet_checkpoint`` (what ``from_single_file`` uses on SDXL's original checkpoint)."""
    import json

    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from memreg.arch.build import published_config
    from memreg.families.sdxl_kohya import sgm_kohya_key, sgm_module_name

    config = (published_config("sdxl", "unet") if which == "published_sdxl"
              else json.loads((tiny_sdxl / "unet" / "config.json").read_text()))
    names = unet_param_names(config)
    ldm = {}
    for name in names:
        module, param = name.rsplit(".", 1)
        ldm[f"model.diffusion_model.{sgm_module_name(module, config)}.{param}"] = name
    assert len(ldm) == len(names)                                   # no two modules share an SGM name
    assert convert_ldm_unet_checkpoint(ldm, config) == {n: n for n in names}
    for module in {n.rsplit(".", 1)[0] for n in names}:             # the kohya (underscore) spelling agrees
        sgm = sgm_module_name(module, config).replace(".", "_")
        assert sgm_kohya_key(f"lora_unet_{module.replace('.', '_')}.alpha", config) == f"lora_unet_{sgm}.alpha"
    if which == "published_sdxl":
        assert len(names) > 1600 and "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in ldm


@contextmanager
def failing_on_warnings():
    """Collect diffusers'/peft's logged warnings (e.g. unexpected or missing LoRA keys) and Python warnings."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(w.message) for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]


def test_kohya_file_loads_into_the_diffusers_sdxl_pipeline_like_the_diffusers_file(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from safetensors.torch import load_file

    from memreg.families import family_named, prompt_encoder
    from memreg.models import load_components
    from memreg.training.checkpoint import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, save_lora
    from memreg.training.setup import add_lora_adapter

    comps = load_components(str(tiny_sdxl))
    unet, te1, te2 = comps.unet, comps.text_encoder, comps.text_encoder_2
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for te in (te1, te2):
        add_lora_adapter(te, LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    gen = torch.Generator().manual_seed(0)
    for model in (unet, te1, te2):
        for name, p in model.named_parameters():
            if "lora_B" in name:   # B starts at zero: give every adapter a visible effect
                p.data.copy_(0.1 * torch.randn(p.shape, generator=gen))
    save_lora(tmp_path, unet, te1, text_encoder_2=te2, family=family_named("sdxl"))

    kohya = load_file(str(tmp_path / KOHYA_WEIGHT_NAME))
    unet_keys = [k for k in kohya if k.startswith("lora_unet_")]
    assert unet_keys and not [k for k in unet_keys if "down_blocks" in k or "up_blocks" in k or "mid_block" in k]
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)
    n_modules = sum(k.endswith(".alpha") for k in unet_keys)
    assert n_modules == sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))

    enc = prompt_encoder(comps)
    cond = enc.encode(["a red circle"]).embeds
    x = torch.randn(1, 4, 16, 16, generator=gen)
    t = torch.tensor([500])
    kw = dict(encoder_hidden_states=cond.embeds, added_cond_kwargs=dict(cond.added))
    ids = enc.ids(["a red circle"])
    with torch.no_grad():
        trained = unet(x, t, **kw).sample
        trained_te = [te1(ids[0]).last_hidden_state, te2(ids[1]).text_embeds]

    outputs = {}
    for weight_name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
        with torch.no_grad():
            base = pipe.unet(x, t, **kw).sample
        with failing_on_warnings() as warned:
            pipe.load_lora_weights(str(tmp_path), weight_name=weight_name)
        assert not warned, (weight_name, warned[:3])
        adapter = pipe.get_list_adapters()["unet"][0]
        loaded = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(f".lora_A.{adapter}"))
        assert loaded == n_modules, weight_name                      # every module came back, none dropped
        with torch.no_grad():
            outputs[weight_name] = pipe.unet(x, t, **kw).sample
            te_out = [pipe.text_encoder(ids[0]).last_hidden_state, pipe.text_encoder_2(ids[1]).text_embeds]
        assert (outputs[weight_name] - base).abs().max() > 1e-3, weight_name
        for a, b in zip(te_out, trained_te):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[KOHYA_WEIGHT_NAME], outputs[LORA_WEIGHT_NAME], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[KOHYA_WEIGHT_NAME], trained, rtol=1e-5, atol=1e-6)
    for key in (f"lora_unet_input_blocks_3_1_{TQ}.lora_down.weight", "lora_unet_input_blocks_2_0_op.alpha",
                "lora_unet_output_blocks_1_2_conv.lora_up.weight", "lora_unet_middle_block_0_emb_layers_1.alpha",
                "lora_unet_input_blocks_0_0.alpha", "lora_unet_out_2.alpha", "lora_unet_label_emb_0_2.alpha"):
        assert key in kohya, key
