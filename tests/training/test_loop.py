"""The training loop on the tiny pipeline: guard variants, RNG isolation, clipping, logging, modes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from .conftest import PENALTY_ON, lora_weights, run


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_plain_run_outputs_and_logs(plain_run):
    out, res = plain_run
    assert res.global_step == 4
    assert (out / "config.yaml").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert [d.name for d in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    log = res.logs[-1]
    for key in ("train/loss_mse", "train/lr", "perf/step_time_s", "perf/samples_per_s", "perf/peak_mem_mb",
                "train/grad_norm"):
        assert key in log and math.isfinite(log[key]), key


def test_penalty_weight_zero_reproduces_the_plain_run(plain_run, tiny_sd_eps, tiny_data, tmp_path):
    out, _ = plain_run
    pen = dict(PENALTY_ON, guard__weight=0.0)
    res = run(tiny_sd_eps, tiny_data, tmp_path / "w0", steps=4, checkpointing_steps=2, **pen)
    assert res.guard.probe_forward == "measure"
    assert all("guard/penalty" in log for log in res.logs)  # probes really ran every step
    assert _max_abs_diff(lora_weights(out), lora_weights(tmp_path / "w0")) <= 1e-6


def test_fused_penalty_with_negligible_weight_stays_on_the_plain_trajectory(plain_run, tiny_sd_eps, tiny_data,
                                                                          tmp_path):
    # The fused path with a ~zero weight: same RNG stream, so weights match the plain run up to the fp32
    # reordering of the weight-gradient sums over the larger batch, which Adam (eps 1e-8) amplifies on
    # near-zero gradient entries (~1e-5 here). A perturbed training RNG stream would differ by ~lr = 1e-3.
    pen = dict(PENALTY_ON, guard__weight=1e-30)
    res = run(tiny_sd_eps, tiny_data, tmp_path / "w_eps", steps=4, **pen)
    assert res.guard.probe_forward == "fused"
    assert _max_abs_diff(lora_weights(plain_run[0]), lora_weights(tmp_path / "w_eps")) <= 1e-4


def test_penalty_run_logs_guard_scalars(penalty_run):
    out, res = penalty_run
    log = res.logs[0]
    for key in ("guard/penalty", "guard/probe_score_mean", "guard/probe_score_p95", "guard/tau",
                "guard/frac_over_tau", "train/loss"):
        assert key in log and math.isfinite(log[key]), key
    assert log["guard/penalty"] > 0  # tau = 0: every probe is over it
    assert res.final_report is not None and math.isfinite(res.final_report["final_cond_ratio"])
    # running tau moved away from 0 and was logged per step
    assert res.logs[-1]["guard/tau"] != 0.0


def test_max_force_caps_the_penalty_in_the_training_loop(tiny_sd_eps, tiny_data, tmp_path):
    """guard.max_force: the logged force ratio is the uncapped one (> the cap here); the applied
    weighted penalty is the raw one scaled by cap / ratio."""
    res = run(tiny_sd_eps, tiny_data, tmp_path / "capped", steps=2, guard__max_force=1e-3, **PENALTY_ON)
    for log in res.logs:
        ratio = log["guard/force_ratio"]
        assert ratio > 1e-3
        assert log["guard/weighted_penalty"] == pytest.approx(log["guard/penalty"] * 1e-3 / ratio, rel=1e-4)


def test_penalty_changes_the_weights(plain_run, penalty_run):
    assert _max_abs_diff(lora_weights(plain_run[0]), lora_weights(penalty_run[0])) > 1e-6


def test_default_penalty_calibrates_tau_in_the_upper_tail(tiny_sd_eps, tiny_data, tmp_path):
    res = run(tiny_sd_eps, tiny_data, tmp_path / "auto", steps=2, guard__type="penalty",
              guard__every_n_steps=1, guard__calibration_prompts=8, guard__calibration_seeds=2)
    cal = res.guard.calibration
    assert cal.quantile == 0.95 and cal.num_values == 16
    assert cal.tau > cal.mu  # upper tail
    assert cal.frac_over <= 0.0625 + 1e-9  # at most 1 of 16 draws above the 0.95 quantile
    assert "guard/cond_ratio" in res.logs[0]


def test_gradient_clipping_really_clips(tiny_sd_eps, tiny_data, tmp_path):
    # One AdamW step from LoRA B = 0: unclipped, |dB| ~ lr; clipped to a total norm of 1e-12 (far below
    # Adam's eps=1e-8) the update shrinks to ~lr * 1e-4. Weight decay off so only the gradient moves B.
    kw = dict(adam_weight_decay=0.0, learning_rate=1e-3)
    run(tiny_sd_eps, tiny_data, tmp_path / "noclip", steps=1, max_grad_norm=1e6, **kw)
    res = run(tiny_sd_eps, tiny_data, tmp_path / "clip", steps=1, max_grad_norm=1e-12, **kw)
    assert res.logs[0]["train/grad_norm"] > 1e-6  # the pre-clip norm was far above the limit

    def max_b(out):
        return max(float(v.abs().max()) for k, v in lora_weights(out).items() if "lora.up" in k or "lora_B" in k)

    assert max_b(tmp_path / "noclip") > 1e-4
    assert max_b(tmp_path / "clip") < 1e-3 * max_b(tmp_path / "noclip")


def test_clip_helper_clips_the_trainable_params():
    from accelerate import Accelerator

    from memreg.training.setup import clip_trainable_grads

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))]
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    acc = Accelerator(cpu=True)
    before = clip_trainable_grads(acc, params, 0.5)
    assert before == pytest.approx(10.0 * math.sqrt(7))
    after = torch.linalg.vector_norm(torch.cat([p.grad for p in params]))
    assert float(after) == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(TypeError):
        clip_trainable_grads(acc, iter(params), 0.5)


def test_wen_filter_huge_tau_keeps_everything_and_matches_plain(plain_run, tiny_sd_eps, tiny_data, tmp_path):
    res = run(tiny_sd_eps, tiny_data, tmp_path / "wen_keep", steps=4, guard__type="wen_filter", guard__wen__tau=1e9)
    assert all(log["guard/wen_kept_frac"] == 1.0 for log in res.logs)
    assert _max_abs_diff(lora_weights(plain_run[0]), lora_weights(tmp_path / "wen_keep")) <= 1e-6


def test_wen_filter_zero_tau_skips_every_step(tiny_sd_eps, tiny_data, tmp_path):
    res = run(tiny_sd_eps, tiny_data, tmp_path / "wen_drop", steps=2, guard__type="wen_filter", guard__wen__tau=0.0)
    assert res.logs[-1]["guard/wen_skipped_steps"] == 2
    assert all(log["guard/wen_kept_frac"] == 0.0 for log in res.logs)
    w = lora_weights(tmp_path / "wen_drop")
    assert all(float(v.abs().max()) == 0.0 for k, v in w.items() if "lora.up" in k or "lora_B" in k)


def test_wen_filter_auto_tau_calibrates(tiny_sd_eps, tiny_data, tmp_path):
    res = run(tiny_sd_eps, tiny_data, tmp_path / "wen_auto", steps=1, guard__type="wen_filter",
              guard__wen__calibration_batches=2)
    assert math.isfinite(res.logs[0]["guard/wen_tau"]) and res.logs[0]["guard/wen_tau"] > 0


def test_wen_masked_loss_drops_exactly_the_samples_at_or_over_tau():
    from memreg.guards.wen_filter import WenFilter

    wf = WenFilter(torch.linspace(0.99, 0.01, 1000), "epsilon", tau=1.0)
    norms = torch.tensor([0.5, 1.5, 1.0, 0.999])
    keep = wf.keep(norms)
    assert keep.tolist() == [True, False, False, True]
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert WenFilter.masked_loss(per_sample, keep).item() == pytest.approx((1.0 + 4.0) / 2)
    assert WenFilter.masked_loss(per_sample, torch.zeros(4, dtype=torch.bool)) is None


def test_wen_norms_convert_v_prediction_to_eps():
    from memreg.guards.wen_filter import WenFilter

    ab = torch.linspace(0.99, 0.01, 1000)
    wf = WenFilter(ab, "v_prediction", tau=1.0)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    vc = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    vu = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 700])
    a = ab[t].sqrt().reshape(-1, 1, 1, 1)
    s = (1 - ab[t]).sqrt().reshape(-1, 1, 1, 1)
    expected = ((a * vc + s * x) - (a * vu + s * x)).flatten(1).norm(dim=1)  # eps = sqrt(ab) v + sqrt(1-ab) x
    assert torch.allclose(wf.norms(vc, vu, x, t), expected, atol=1e-6)


def test_caption_noise_inserts_words_and_noises_embeddings(tiny_sd_eps, tiny_data, tmp_path):
    from memreg.guards.caption_noise import CaptionNoise
    from memreg.models import load_components

    tok = load_components(str(tiny_sd_eps), with_vae=False).tokenizer
    cn = CaptionNoise.from_tokenizer(tok, word_prob=1.0, num_words=2, seed=0)
    out = cn.captions(["a red circle", "a blue square"])
    assert all(len(o.split(" ")) >= len(c.split(" ")) + 2 for o, c in zip(out, ["a red circle", "a blue square"]))
    cn0 = CaptionNoise.from_tokenizer(tok, word_prob=0.0, num_words=2, seed=0)
    assert cn0.captions(["a red circle"]) == ["a red circle"]
    e = torch.zeros(2, 5, 3)
    torch.manual_seed(0)
    noisy = CaptionNoise.from_tokenizer(tok, embed_noise=0.5).embeds(e)
    torch.manual_seed(0)
    assert torch.allclose(noisy, 0.5 * torch.randn_like(e))
    res = run(tiny_sd_eps, tiny_data, tmp_path / "cn", steps=2, guard__type="caption_noise",
              guard__caption_noise__word_prob=0.5, guard__caption_noise__embed_noise=0.1)
    assert res.global_step == 2


def test_text_encoder_lora_output_loads(tiny_sd_eps, tiny_data, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = tmp_path / "te"
    run(tiny_sd_eps, tiny_data, out, steps=2, train_text_encoder=True, lora_alpha=8)
    keys = lora_weights(out).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    kohya = load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert any(k.startswith("lora_te_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_eps), safety_checker=None)
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
        from transformers.utils.peft_utils import check_peft_version

        check_peft_version(MIN_PEFT_VERSION)
    except (ImportError, ValueError) as e:
        pytest.skip(f"diffusers loads text-encoder LoRA through transformers' PEFT integration: {e}")
    pipe.load_lora_weights(str(out))


def test_full_finetune_with_ema_saves_a_pipeline(tiny_sd_eps, tiny_data, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "full"
    res = run(tiny_sd_eps, tiny_data, out, steps=2, mode="full", use_ema=True, ema_decay=0.5, checkpointing_steps=1,
              learning_rate=1e-3)
    assert res.global_step == 2
    assert (out / "checkpoint-1" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "checkpoint-1" / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    # the hooks wrote the models in diffusers format: accelerate's own model file is absent
    assert not (out / "checkpoint-1" / "model.safetensors").exists()
    assert {p.name for p in (out / "checkpoint-1").glob("*.bin")} <= {"optimizer.bin", "scheduler.bin"}
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    base = UNet2DConditionModel.from_pretrained(str(tiny_sd_eps), subfolder="unet")
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(pipe.unet.parameters(), base.parameters()))
    assert diff > 0


# ---------------------------------------------------------------------------- bad inputs fail before training

def _entry():
    import importlib.util

    entry = Path(__file__).resolve().parents[2] / "train" / "train.py"
    spec = importlib.util.spec_from_file_location("train_entry", entry)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture
def no_weights(monkeypatch):
    import memreg.training.loop as loop

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(loop, "setup_models", boom)


@pytest.mark.parametrize("case, error, match", [
    ("missing_data", "DataError", "does not exist"),
    ("caption_column", "DataError", "caption_column 'caption'"),
    ("resolution", "ConfigError", "resolution=30"),
    ("unknown_key", "ConfigError", "did you mean 'max_train_steps'"),
    ("prediction_type", "ConfigError", "contradicts the model"),
    ("output_dir", "CheckpointError", "not empty"),
])
def test_bad_inputs_fail_before_training(case, error, match, tiny_sd_eps, tiny_data, tmp_path, no_weights):
    from .conftest import base_argv

    out = tmp_path / "out"
    data = tmp_path / "nope" if case == "missing_data" else tiny_data
    argv = base_argv(tiny_sd_eps, data, out, steps=2)
    argv += {"caption_column": ["--caption_column", "caption"], "resolution": ["--resolution", "30"],
             "unknown_key": ["--max_train_step", "3"], "prediction_type": ["--prediction_type", "v_prediction"],
             }.get(case, [])
    if case == "output_dir":
        out.mkdir()
        (out / "keep.txt").write_text("user data")
    with pytest.raises(Exception) as info:
        _entry()(argv)
    assert type(info.value).__name__ == error
    assert match in str(info.value)
    if case == "output_dir":
        assert (out / "keep.txt").read_text() == "user data" and len(list(out.iterdir())) == 1


def test_monitor_runs_on_heldout_split_and_leaves_training_untouched(plain_run, tiny_sd_eps, tiny_data, tmp_path):
    pytest.importorskip("memreg.monitor")
    out = tmp_path / "mon"
    res = run(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=2, eval__enabled="true",
              eval__every_n_steps=2, eval__heldout_fraction=0.25, eval__seeds=1, eval__max_generate_prompts=1,
              eval__num_images_per_prompt=1, eval__num_inference_steps=2)
    assert res.data_summary.num_heldout == 2 and res.data_summary.num_train == 6
    mem = out / "memorization"
    assert (mem / "eval_step00000000.json").is_file() and (mem / "eval_step00000004.json").is_file()
    assert res.global_step == 4


def test_monitor_does_not_perturb_the_training_trajectory(plain_run, tiny_sd_eps, tiny_data, tmp_path):
    pytest.importorskip("memreg.monitor")
    out = tmp_path / "mon_same"
    run(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=2, eval__enabled="true", eval__every_n_steps=1,
        eval__seeds=1, eval__generate_at_end="false")
    assert (out / "memorization" / "eval_step00000002.json").is_file()
    assert _max_abs_diff(lora_weights(plain_run[0]), lora_weights(out)) == 0.0


def test_v_prediction_snr_accumulation_and_cached_latents_with_penalty(tiny_sd_v, tiny_data, tmp_path):
    res = run(tiny_sd_v, tiny_data, tmp_path / "v", steps=2, train_batch_size=2, gradient_accumulation_steps=2,
              snr_gamma=5.0, noise_offset=0.05, cache_latents="true", guard__type="penalty",
              guard__every_n_steps=1, guard__calibration_prompts=4, guard__calibration_seeds=1, guard__term="norm")
    assert res.global_step == 2 and res.guard.calibration is not None
    assert all(math.isfinite(log["train/loss_mse"]) and "guard/penalty" in log for log in res.logs)
    assert lora_weights(tmp_path / "v")


def test_tensorboard_scalars_are_written(penalty_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = penalty_run
    tags = set()
    for ev in (out / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        tags |= set(acc.Tags().get("scalars", []))
    for tag in ("train/loss_mse", "guard/penalty", "guard/probe_score_mean", "guard/probe_score_p95", "guard/tau",
                "guard/frac_over_tau", "train/lr", "perf/step_time_s", "perf/samples_per_s", "perf/peak_mem_mb",
                "guard/final_cond_ratio"):
        assert tag in tags, tag


# ---------------------------------------------------------------------------- the guard API in a hand-written loop

def _readme_guard_lines() -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Add the guard to your own training loop", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("guard", ["penalty", "agc"])
def test_readme_guard_lines_in_a_hand_written_loop_match_the_trainer(guard, tiny_sd_eps, tiny_data, tmp_path,
                                                                    monkeypatch):
    """The README's lines, run verbatim around a plain UNet call, give the trainer's first-step loss on the
    same batch (same latents, noise, timesteps; LoRA starts at zero, so the base UNet is the same model)."""
    import torch.nn.functional as F

    import memreg.training.loop as loop
    from memreg.models import load_components

    seen = {}
    noised, micro = loop._noisy_latents, loop._micro_step

    def spy_noised(batch, m, noise_offset=0.0, gen=None):
        out = noised(batch, m, noise_offset=noise_offset, gen=gen)
        if gen is None:  # the training step's draws (a generator: the guard's calibration batches)
            seen.setdefault("noised", out[1:])
        return out

    def spy_micro(run_, batch):
        out = micro(run_, batch)
        seen.setdefault("loss", out.loss.detach().clone())
        seen.setdefault("captions", list(batch["caption"]))
        return out

    monkeypatch.setattr(loop, "_noisy_latents", spy_noised)
    monkeypatch.setattr(loop, "_micro_step", spy_micro)
    res = run(tiny_sd_eps, tiny_data, tmp_path / "trainer", steps=1, guard__type=guard, guard__seed=0,
              guard__calibration_prompts=64)
    noise, timesteps, noisy_latents = seen["noised"]

    c = load_components(str(tiny_sd_eps), with_vae=False)
    unet, noise_scheduler, tokenizer, text_encoder = c.unet, c.scheduler, c.tokenizer, c.text_encoder
    captions = list(res.guard.ctx.train_captions)
    ids = tokenizer(seen["captions"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
    scope = dict(unet=unet, noise_scheduler=noise_scheduler, tokenizer=tokenizer, text_encoder=text_encoder,
                 captions=captions, batch_captions=seen["captions"], global_step=0, noisy_latents=noisy_latents, timesteps=timesteps,
                 encoder_hidden_states=encoder_hidden_states, target=noise, F=F)
    lines = _readme_guard_lines().replace('{"type": "anisotropy_gate"}', f'{{"type": "{guard}"}}')
    assert len([ln for ln in lines.splitlines() if ln.strip() and not ln.startswith("#")]) <= 12
    exec(compile(lines, "README.md", "exec"), scope)
    assert scope["extra"] is None   # agc: no extra inputs; penalty at weight 0: probes in a no-grad forward ...
    if guard == "penalty":
        assert scope["guard"]._outs    # ... that ran on this step
    assert scope["loss"].item() == pytest.approx(seen["loss"].item(), rel=1e-5, abs=1e-7)


def test_agc_resumes_exactly(tiny_sd_eps, tiny_data, tmp_path):
    kw = dict(guard__type="agc", guard__agc__decay=0.5, checkpointing_steps=2)
    straight = run(tiny_sd_eps, tiny_data, tmp_path / "straight", steps=4, **kw)
    run(tiny_sd_eps, tiny_data, tmp_path / "killed", steps=4, stop_at_step=2, **kw)
    resumed = run(tiny_sd_eps, tiny_data, tmp_path / "killed", steps=4, resume_from_checkpoint="latest", **kw)
    assert torch.equal(straight.guard.avg, resumed.guard.avg) and int((straight.guard.avg > 0).sum()) >= 8
    assert _max_abs_diff(lora_weights(tmp_path / "straight"), lora_weights(tmp_path / "killed")) == 0.0
    assert all(0.0 <= log["guard/agc_kept_frac"] <= 1.0 for log in straight.logs)


def test_adamw_is_fused_where_torch_has_the_kernel():
    from memreg.training import loop

    assert loop._fused_adam([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]) is True
    assert loop._fused_adam([torch.nn.Parameter(torch.zeros(3, device="meta"))]) is None   # torch's own choice
    assert loop._fused_adam([]) is None
