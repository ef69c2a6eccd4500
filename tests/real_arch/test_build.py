"""memreg.arch.build without building a model: the published configs' shapes, the depth cap, bad requests."""

from __future__ import annotations

import json

import pytest

from memreg.arch.build import (FAMILIES, ArchError, build_pipeline_dir, cap_blocks, components, config_digest,
                               published_config, unet_config, vae_scale)


def test_every_family_ships_its_component_configs():
    assert components("sd15") == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert components("sd21") == components("sd15")
    assert components("sdxl") == ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                  "unet", "vae"]
    for family in FAMILIES:
        assert vae_scale(family) == 8                      # 4 VAE levels: 3 downsamplings
        assert len(config_digest(family)) == 64


def test_published_values_tie_the_components_together():
    """Each UNet's cross-attention width is its text encoder(s)' hidden size (SDXL: the two summed),
    and SDXL's added embedding takes the pooled 1280-d embedding plus 6 time ids x 256."""
    for family in ("sd15", "sd21"):
        assert published_config(family, "unet")["cross_attention_dim"] == \
            published_config(family, "text_encoder")["hidden_size"]
    x = published_config("sdxl", "unet")
    assert x["cross_attention_dim"] == 768 + 1280 == published_config("sdxl", "text_encoder")["hidden_size"] + \
        published_config("sdxl", "text_encoder_2")["hidden_size"]
    assert x["projection_class_embeddings_input_dim"] == 1280 + 6 * x["addition_time_embed_dim"] == 2816
    assert published_config("sd21", "scheduler")["prediction_type"] == "v_prediction"
    assert published_config("sd15", "scheduler")["prediction_type"] == "epsilon"
    assert published_config("sdxl", "tokenizer_2")["pad_token"] == "!"


def test_sample_size_and_block_cap_are_the_only_changes():
    full = published_config("sdxl", "unet")
    capped = unet_config("sdxl", 8, blocks=1)
    assert capped["transformer_layers_per_block"] == [1, 1, 1] and capped["sample_size"] == 8
    assert {k for k in full if full[k] != capped[k]} == {"transformer_layers_per_block", "sample_size"}
    assert cap_blocks([1, 2, 10], 2) == [1, 2, 2] and cap_blocks(1, 4) == 1
    assert "transformer_layers_per_block" not in published_config("sd15", "unet")


def test_bad_requests_fail_with_one_line(tmp_path):
    with pytest.raises(ArchError, match="unknown model family 'sd3'"):
        build_pipeline_dir("sd3", tmp_path / "x", sample_size=8)
    with pytest.raises(ArchError, match="sample_size must be >= 1"):
        build_pipeline_dir("sd15", tmp_path / "x", sample_size=0)
    with pytest.raises(ArchError, match="blocks must be >= 1"):
        build_pipeline_dir("sdxl", tmp_path / "x", sample_size=8, blocks=0)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(ArchError, match="not empty"):
        build_pipeline_dir("sd15", tmp_path / "used", sample_size=8)
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


def test_config_files_are_valid_json():
    from memreg.arch.build import config_files

    for family in FAMILIES:
        files = config_files(family)
        assert files and all(isinstance(json.loads(f.read_text()), dict) for f in files)
