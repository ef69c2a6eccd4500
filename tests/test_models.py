"""memreg/models.py: component loading and early, named errors for bad checkpoints."""

import shutil

import pytest
import torch

from memreg.models import ModelError, check_model_path, load_components, parse_dtype


def test_load_components_reads_every_part(tiny_sd_v):
    comps = load_components(str(tiny_sd_v), with_vae=False)
    assert comps.vae is None
    assert comps.prediction_type == "v_prediction"
    assert not any(p.requires_grad for p in comps.unet.parameters())
    assert comps.unet.config.cross_attention_dim == comps.text_encoder.config.hidden_size


def test_dtype_is_applied(tiny_sd_eps):
    comps = load_components(str(tiny_sd_eps), dtype="bf16", with_vae=False)
    assert comps.unet.dtype == torch.bfloat16 and comps.text_encoder.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="float8"):
        parse_dtype("float8")


def test_missing_unet_is_named(tiny_sd_eps, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_eps, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelError, match="unet/"):
        load_components(str(broken))


def test_paths_and_hub_ids(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        check_model_path(str(tmp_path / "nope"))
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        check_model_path(str(f))
    check_model_path("runwayml/stable-diffusion-v1-5")  # hub ids are left to from_pretrained
