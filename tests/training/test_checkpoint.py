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


def test_lora_fused_for_inference_gives_the_adapters_images_with_plain_layers(plain_run, tiny_sd_eps):
    from diffusers import StableDiffusionPipeline

    from memreg.generation import load_lora_fused

    out, _ = plain_run

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    adapters = StableDiffusionPipeline.from_pretrained(str(tiny_sd_eps), safety_checker=None)
    adapters.load_lora_weights(str(out))
    fused = load_lora_fused(StableDiffusionPipeline.from_pretrained(str(tiny_sd_eps), safety_checker=None), str(out))
    assert not any("lora" in name for name, _ in fused.unet.named_modules())
    assert np.abs(sample(fused) - sample(adapters)).max() < 1e-4


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

def test_guard_state_roundtrip(tmp_path):
    from memreg.guards.caption_noise import CaptionNoise
    from memreg.guards.wen_filter import WenFilter

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


# ---------------------------------------------------------------------------- crash-safe saves: helpers

def _fake_checkpoint(out, step: int, complete: bool = True, processes: int = 1):
    """A checkpoint dir with accelerate's file names and dummy contents; ``complete``: with the marker."""
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name in ckpt.required_files(processes) + [ckpt.LORA_WEIGHT_NAME]:
        (d / name).write_bytes(b"x" * (10 + step))
    if complete:
        ckpt._write_marker(d, step, processes)
    return d


def test_latest_skips_incomplete_checkpoints_and_unfinished_saves_naming_them(tmp_path, caplog):
    for s in (1, 2, 10):
        _fake_checkpoint(tmp_path, s)
    _fake_checkpoint(tmp_path, 12, complete=False)          # an old-style / interrupted dir
    (tmp_path / "checkpoint-11.tmp-4242").mkdir()           # a save killed before the rename
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2", "checkpoint-10",
                                                                 "checkpoint-12"]
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume("latest", str(tmp_path)).name == "checkpoint-10"
    assert "checkpoint-12 (no checkpoint_complete.json" in caplog.text
    assert "checkpoint-11.tmp-4242 (unfinished save)" in caplog.text and "resuming from checkpoint-10" in caplog.text
    assert ckpt.resolve_resume("checkpoint-2", str(tmp_path)).name == "checkpoint-2"
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-7"):
        ckpt.resolve_resume("checkpoint-7", str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-12.*incomplete: no checkpoint_complete.json"):
        ckpt.resolve_resume("checkpoint-12", str(tmp_path))
    assert ckpt.resolve_resume("latest", str(tmp_path / "empty")) is None


def test_prune_keeps_the_new_checkpoint_and_never_counts_incomplete_ones(tmp_path):
    for s in (1, 2, 10):
        _fake_checkpoint(tmp_path, s)
    _fake_checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-11.tmp-4242").mkdir()
    removed = ckpt.prune_checkpoints(tmp_path, limit=2, keep=tmp_path / "checkpoint-1")
    # 3 complete, limit 2: the oldest that is not the one just written goes; the unfinished save goes too
    assert sorted(p.name for p in removed) == ["checkpoint-11.tmp-4242", "checkpoint-2"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-10", "checkpoint-12"]


def test_a_truncated_or_missing_file_makes_a_checkpoint_incomplete(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 1)
    c2 = _fake_checkpoint(tmp_path, 2)
    (c2 / "optimizer.bin").write_bytes(b"x")               # 12 bytes were written
    assert ckpt.completeness_problem(c2) == "optimizer.bin has 1 bytes, 12 were written"
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume("latest", str(tmp_path)).name == "checkpoint-1"
    assert "checkpoint-2 (optimizer.bin has 1 bytes" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="optimizer.bin has 1 bytes"):
        ckpt.resolve_resume("checkpoint-2", str(tmp_path))
    (c2 / "optimizer.bin").write_bytes(b"x" * 12)
    (c2 / ckpt.LORA_WEIGHT_NAME).unlink()
    assert ckpt.completeness_problem(c2).startswith(f"{ckpt.LORA_WEIGHT_NAME} is missing")


def test_missing_rng_optimizer_or_scheduler_state_is_an_error_naming_the_file(tmp_path, caplog):
    for i, name in enumerate(["random_states_0.pkl", "optimizer.bin", "scheduler.bin"]):
        d = _fake_checkpoint(tmp_path / str(i), 3)
        (d / name).unlink()
        (d / ckpt.COMPLETE_MARKER).unlink()
        ckpt._write_marker(d, 3, 1)                          # even with a marker that agrees
        with pytest.raises(ckpt.CheckpointError, match=f"checkpoint-3.*incomplete: {name} is missing"):
            ckpt.verify_checkpoint(d)
    # saved by one process, resumed by two: random_states_1.pkl is missing
    with pytest.raises(ckpt.CheckpointError, match="random_states_1.pkl is missing"):
        ckpt.verify_checkpoint(_fake_checkpoint(tmp_path / "p", 1), num_processes=2)
    with caplog.at_level("WARNING"):
        ckpt.verify_checkpoint(tmp_path / "0" / "checkpoint-3", allow_incomplete=True)
    assert "random_states_0.pkl is missing" in caplog.text and "will NOT match" in caplog.text


def test_latest_on_a_finished_run_without_checkpoints_refuses(tmp_path, caplog):
    (tmp_path / ckpt.LORA_WEIGHT_NAME).write_bytes(b"final")
    _fake_checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(ckpt.CheckpointError, match="finished run.*nothing to resume"):
        ckpt.resolve_resume("latest", str(tmp_path))
    fresh = tmp_path / "killed_during_its_first_save"
    (fresh / "checkpoint-1.tmp-4242").mkdir(parents=True)
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume("latest", str(fresh)) is None
    assert "starting at step 0" in caplog.text


def test_output_dir_rules(tmp_path):
    ckpt.check_output_dir(str(tmp_path / "new"), resuming=False, overwrite=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("mine")
    with pytest.raises(ckpt.CheckpointError, match="not empty"):
        ckpt.check_output_dir(str(tmp_path / "used"), resuming=False, overwrite=False)
    ckpt.check_output_dir(str(tmp_path / "used"), resuming=True, overwrite=False)
    ckpt.check_output_dir(str(tmp_path / "used"), resuming=False, overwrite=True)
    with pytest.raises(ckpt.CheckpointError, match="give one of them"):
        ckpt.check_output_dir(str(tmp_path / "used"), resuming=True, overwrite=True)


# ---------------------------------------------------------------------------- crash-safe saves: real runs

def _fail_save_at(monkeypatch, step: int, point: str):
    """Make the save of checkpoint-``step`` raise at ``point``: 'scheduler.bin' (after the LoRA file, the
    guard state and optimizer.bin were written) or 'marker' (every file written, marker not yet)."""
    import accelerate.checkpointing as acp

    class Killed(RuntimeError):
        pass

    if point == "marker":
        real_marker = ckpt._write_marker

        def marker(directory, s, n):
            if s == step:
                raise Killed(f"killed before the marker of checkpoint-{s}")
            real_marker(directory, s, n)
        monkeypatch.setattr(ckpt, "_write_marker", marker)
    else:
        real_save = acp.save

        def save(obj, f, *a, **k):
            if f"checkpoint-{step}.tmp-" in str(f) and str(f).endswith(point):
                raise Killed(f"killed while writing {f}")
            return real_save(obj, f, *a, **k)
        monkeypatch.setattr(acp, "save", save)
    return Killed


@pytest.mark.parametrize("point", ["scheduler.bin", "marker"])
def test_a_save_killed_midway_keeps_the_previous_checkpoint_and_resume_is_exact(point, plain_run, tiny_sd_eps,
                                                                               tiny_data, tmp_path, monkeypatch,
                                                                               caplog):
    full_out, _ = plain_run                                  # 4 uninterrupted steps
    out = tmp_path / "killed_in_save"
    kw = {"steps": 4, "checkpointing_steps": 1, "checkpoints_total_limit": 1}
    killed = _fail_save_at(monkeypatch, 3, point)
    with pytest.raises(killed):
        run(tiny_sd_eps, tiny_data, out, **kw)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]   # limit 1: pruned only after a save
    assert ckpt.completeness_problem(out / "checkpoint-2") is None
    (tmp,) = ckpt.unfinished_saves(out)
    assert tmp.name.startswith("checkpoint-3.tmp-") and not (tmp / ckpt.COMPLETE_MARKER).exists()
    assert (tmp / "optimizer.bin").is_file() and (tmp / "scheduler.bin").is_file() == (point == "marker")
    with caplog.at_level("WARNING"):
        res = run(tiny_sd_eps, tiny_data, out, resume_from_checkpoint="latest", **kw)
    assert f"{tmp.name} (unfinished save)" in caplog.text and "resuming from checkpoint-2" in caplog.text
    assert res.global_step == 4 and not ckpt.unfinished_saves(out)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4"]
    _assert_identical(lora_weights(full_out), lora_weights(out))


def test_resume_from_a_checkpoint_without_rng_state_is_refused(plain_run, tiny_sd_eps, tiny_data, tmp_path):
    import shutil

    out = tmp_path / "no_rng"
    shutil.copytree(plain_run[0] / "checkpoint-2", out / "checkpoint-2")
    (out / "checkpoint-2" / "random_states_0.pkl").unlink()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint .* is complete .*random_states_0.pkl is missing"):
        run(tiny_sd_eps, tiny_data, out, steps=4, resume_from_checkpoint="latest")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-2.*incomplete: random_states_0.pkl is missing"):
        run(tiny_sd_eps, tiny_data, out, steps=4, resume_from_checkpoint="checkpoint-2")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]    # refused before writing anything


def test_latest_on_a_finished_run_leaves_it_untouched(tiny_sd_eps, tiny_data, tmp_path):
    out = tmp_path / "finished"
    run(tiny_sd_eps, tiny_data, out, steps=1)                # no checkpoint (checkpointing_steps 1000)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ckpt.CheckpointError, match="finished run"):
        run(tiny_sd_eps, tiny_data, out, steps=2, resume_from_checkpoint="latest", seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_overwrite_moves_the_old_run_aside_and_never_resumes_it(tiny_sd_eps, tiny_data, tmp_path, caplog):
    out = tmp_path / "reused"
    run(tiny_sd_eps, tiny_data, out, steps=2, checkpointing_steps=1, seed=0)
    old_weights = lora_weights(out)
    with caplog.at_level("WARNING"):
        run(tiny_sd_eps, tiny_data, out, steps=2, checkpointing_steps=1, checkpoints_total_limit=1, seed=1,
            stop_at_step=1, overwrite_output_dir="true")
    (prev,) = tmp_path.glob("reused.prev-*")
    assert f"moved the previous run in {out} to {prev}" in caplog.text
    assert [p.name for p in ckpt.list_checkpoints(prev)] == ["checkpoint-1", "checkpoint-2"]
    _assert_identical(lora_weights(prev), old_weights)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"] and not (out / ckpt.LORA_WEIGHT_NAME).exists()
    run(tiny_sd_eps, tiny_data, out, steps=2, checkpointing_steps=1, checkpoints_total_limit=1, seed=1,
        resume_from_checkpoint="latest")
    straight = tmp_path / "seed1"
    run(tiny_sd_eps, tiny_data, straight, steps=2, seed=1)
    _assert_identical(lora_weights(straight), lora_weights(out))
    assert "seed: 1" in (out / "config.yaml").read_text()
