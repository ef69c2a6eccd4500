"""Checkpoints, resume exactness, LoRA/kohya outputs."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from memreg.training import checkpoint as ckpt
from .conftest import PENALTY_ON, lora_weights, run


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------- resume exactness

def test_resume_is_exact(plain_run, tiny_sd_eps, tiny_data, tmp_path):
    full_out, _ = plain_run  # 4 steps, checkpoints at 2 and 4
    out = tmp_path / "killed"
    first = run(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=2, stop_at_step=2)
    assert first.global_step == 2 and not (out / ckpt.LORA_WEIGHT_NAME).exists()
    res = run(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=2, resume_from_checkpoint="latest")
    assert res.global_step == 4
    _assert_identical(lora_weights(full_out), lora_weights(out))


def test_resume_is_exact_with_the_penalty(penalty_run, tiny_sd_eps, tiny_data, tmp_path):
    full_out, full_res = penalty_run
    out = tmp_path / "killed_pen"
    run(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=2, stop_at_step=2, **PENALTY_ON)
    assert (out / "checkpoint-2" / "guard_state_0.json").is_file()
    res = run(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=2, resume_from_checkpoint="checkpoint-2",
              **PENALTY_ON)
    _assert_identical(lora_weights(full_out), lora_weights(out))
    # the running tau and the probe stream continued exactly
    assert res.logs[-1]["guard/tau"] == full_res.logs[-1]["guard/tau"]
    assert res.logs[-1]["guard/probe_score_mean"] == full_res.logs[-1]["guard/probe_score_mean"]


# ---------------------------------------------------------------------------- outputs

def test_lora_output_loads_into_a_fresh_pipeline_and_changes_it(plain_run, tiny_sd_eps):
    from diffusers import StableDiffusionPipeline

    out, _ = plain_run
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_eps), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    before = sample()
    pipe.load_lora_weights(str(out))
    after = sample()
    assert np.abs(after - before).max() > 1e-4


def test_kohya_copy_has_lora_unet_keys_and_the_real_alpha(tiny_sd_eps, tiny_data, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = tmp_path / "alpha"
    run(tiny_sd_eps, tiny_data, out, steps=1, rank=4, lora_alpha=8, learning_rate=1e-2)
    kohya = load_file(str(out / ckpt.KOHYA_WEIGHT_NAME))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    down = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float(kohya[f"{down}.alpha"]) == 8.0
    # diffusers applies the same scale alpha / r = 2: fused weight = W + 2 * up @ down
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_eps), safety_checker=None)
    base = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    fused = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    fused_w = (fused.base_layer.weight if hasattr(fused, "base_layer") else fused.weight).detach()
    expected = base + 2.0 * kohya[f"{down}.lora_up.weight"] @ kohya[f"{down}.lora_down.weight"]
    assert torch.allclose(fused_w, expected, atol=1e-6)


def test_checkpoint_holds_a_loadable_lora_file_and_no_pickled_model(plain_run):
    from safetensors.torch import load_file

    out, _ = plain_run
    c = out / "checkpoint-2"
    assert (c / ckpt.LORA_WEIGHT_NAME).is_file()
    assert not (c / "model.safetensors").exists() and not (c / "pytorch_model.bin").exists()
    assert load_file(str(c / ckpt.LORA_WEIGHT_NAME))


# ---------------------------------------------------------------------------- helpers

def test_prune_and_resolve(tmp_path):
    for s in (1, 2, 10):
        (tmp_path / f"checkpoint-{s}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2", "checkpoint-10"]
    assert ckpt.resolve_resume("latest", str(tmp_path)).name == "checkpoint-10"
    assert ckpt.resolve_resume("checkpoint-2", str(tmp_path)).name == "checkpoint-2"
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-7"):
        ckpt.resolve_resume("checkpoint-7", str(tmp_path))
    removed = ckpt.prune_checkpoints(tmp_path, limit=2)
    assert [p.name for p in removed] == ["checkpoint-1", "checkpoint-2"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-10"]
    assert ckpt.resolve_resume("latest", str(tmp_path / "empty")) is None


def test_output_dir_rules(tmp_path):
    ckpt.check_output_dir(str(tmp_path / "new"), resuming=False, overwrite=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("mine")
    with pytest.raises(ckpt.CheckpointError, match="not empty"):
        ckpt.check_output_dir(str(tmp_path / "used"), resuming=False, overwrite=False)
    ckpt.check_output_dir(str(tmp_path / "used"), resuming=True, overwrite=False)
    ckpt.check_output_dir(str(tmp_path / "used"), resuming=False, overwrite=True)


def test_guard_state_roundtrip(tmp_path):
    from memreg.baselines import CaptionNoise, WenFilter

    cn = CaptionNoise(lambda i: f"w{i}", 1000, word_prob=1.0, seed=3)
    cn.captions(["a b c"])
    wf = WenFilter(torch.linspace(0.9, 0.1, 10), "epsilon", tau="auto")
    wf.calibrate(torch.tensor([1.0, 2.0, 3.0]))
    ckpt.save_guard_state({"caption_noise": cn, "wen_filter": wf}, tmp_path, rank=1)
    cn2 = CaptionNoise(lambda i: f"w{i}", 1000, word_prob=1.0, seed=99)
    wf2 = WenFilter(torch.linspace(0.9, 0.1, 10), "epsilon", tau="auto")
    ckpt.load_guard_state({"caption_noise": cn2, "wen_filter": wf2}, tmp_path, rank=1)
    assert wf2.tau == wf.tau
    assert cn2.captions(["x y"]) == cn.captions(["x y"])
    with pytest.raises(ckpt.CheckpointError, match="guard_state_0"):
        ckpt.load_guard_state({"wen_filter": wf2}, tmp_path, rank=0)


def test_full_fine_tuning_with_text_encoder_trains_saves_and_resumes_exactly(tiny_sd_eps, tiny_data, tmp_path):
    from safetensors.torch import load_file

    def weights(out, sub, name):
        return load_file(str(out / sub / name))

    kw = dict(mode="full", train_text_encoder=True, checkpointing_steps=1, learning_rate=1e-3)
    straight = tmp_path / "straight"
    run(tiny_sd_eps, tiny_data, straight, steps=2, **kw)
    killed = tmp_path / "killed_full"
    run(tiny_sd_eps, tiny_data, killed, steps=2, stop_at_step=1, **kw)
    assert (killed / "checkpoint-1" / "text_encoder").is_dir()
    run(tiny_sd_eps, tiny_data, killed, steps=2, resume_from_checkpoint="latest", **kw)
    for sub, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        _assert_identical(weights(straight, sub, name), weights(killed, sub, name))
    base_te = weights(tiny_sd_eps, "text_encoder", "model.safetensors")
    trained_te = weights(straight, "text_encoder", "model.safetensors")
    assert any(not torch.equal(base_te[k], trained_te[k]) for k in base_te)
