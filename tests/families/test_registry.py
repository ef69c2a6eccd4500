"""memreg/families/registry.py: which family a checkpoint is, from its config files."""

from __future__ import annotations

import json
import shutil

import pytest

from memreg.families import FAMILIES, ModelError, detect_family, family_named, family_of
from memreg.families.registry import match_family
from memreg.models import check_model_path, load_components


@pytest.mark.parametrize("class_name, unet, sched, family, preset", [
    # SD 1.5: 768-d CLIP ViT-L, epsilon
    ("StableDiffusionPipeline", {"cross_attention_dim": 768}, {"prediction_type": "epsilon"}, "sd1", "sd1"),
    # SD 2.1: 1024-d OpenCLIP-H, v-prediction -> the paper's SD2 weights
    ("StableDiffusionPipeline", {"cross_attention_dim": 1024}, {"prediction_type": "v_prediction"}, "sd2", "sd2"),
    # SD 2.1-base: 1024-d, epsilon -> SD 2.x, but the SD1 weights (the paper's SD2 weights came with v-prediction)
    ("StableDiffusionPipeline", {"cross_attention_dim": 1024}, {"prediction_type": "epsilon"}, "sd2", "sd1"),
    # SDXL base: by its pipeline class, and without a model_index.json by its text_time UNet
    ("StableDiffusionXLPipeline", {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, {}, "sdxl", "sdxl"),
    (None, {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, {"prediction_type": "epsilon"}, "sdxl",
     "sdxl"),
    (None, {"cross_attention_dim": 768}, {}, "sd1", "sd1"),
])
def test_family_from_configs(class_name, unet, sched, family, preset):
    fam = match_family(class_name, unet, sched)
    assert fam.name == family and fam.default_preset(sched.get("prediction_type")) == preset


def test_unknown_pipeline_class_is_named():
    with pytest.raises(ModelError, match="FluxPipeline"):
        match_family("FluxPipeline", {}, {})
    with pytest.raises(ModelError, match="unknown model family 'sd9'"):
        family_named("sd9")


def test_every_family_has_a_unique_name_and_its_presets_exist():
    from memreg.score import PRESETS

    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    for f in FAMILIES:
        assert f.default_preset("epsilon") in PRESETS and f.subfolders and f.label
    assert family_named("sdxl").preset_validated is False and "not validated" in family_named("sdxl").preset_note


def test_tiny_pipelines_are_detected_from_their_dirs(tiny_sd_eps, tiny_sd_v, tiny_sdxl, tmp_path):
    assert detect_family(str(tiny_sd_eps)).name == "sd1"
    assert detect_family(str(tiny_sd_v)).name == "sd2"
    assert detect_family(str(tiny_sdxl)).name == "sdxl"
    assert json.loads((tiny_sdxl / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    bare = tmp_path / "no_index"
    shutil.copytree(tiny_sdxl, bare)
    (bare / "model_index.json").unlink()
    assert detect_family(str(bare)).name == "sdxl"   # from the UNet's addition_embed_type


def test_sdxl_dir_without_second_encoder_is_named(tiny_sdxl, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelError, match="text_encoder_2/"):
        check_model_path(str(broken))
    with pytest.raises(ModelError, match="text_encoder_2/"):
        check_model_path(str(broken), ("unet", "text_encoder", "tokenizer", "scheduler"))


def test_loaded_components_know_their_family(eps_components, v_components, sdxl_components):
    assert family_of(eps_components).name == "sd1" and family_of(v_components).name == "sd2"
    assert family_of(sdxl_components).name == "sdxl"
    assert family_of(sdxl_components.unet, sdxl_components.scheduler).name == "sdxl"
    assert type(sdxl_components.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert sdxl_components.vae_scale_factor == 2 and sdxl_components.image_size() == 32


def test_separate_vae_is_loaded_from_its_own_dir(tiny_sdxl, tmp_path):
    vae_dir = tmp_path / "vae_only"
    shutil.copytree(tiny_sdxl / "vae", vae_dir)
    comps = load_components(str(tiny_sdxl), vae_model=str(vae_dir))
    ref = load_components(str(tiny_sdxl))
    assert all((a == b).all() for a, b in zip(comps.vae.state_dict().values(), ref.vae.state_dict().values()))
    with pytest.raises(ModelError, match="cannot load"):
        load_components(str(tiny_sdxl), vae_model=str(_empty(tmp_path)))   # a dir with no VAE config


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d
