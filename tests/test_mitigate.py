"""Inference-time mitigation (memreg/mitigate.py) on the tiny pipeline."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from memreg.encoding import PromptEncoder
from memreg.generation import build_pipeline, generate_images, initial_latents
from memreg.mitigate import (MitigationConfig, calibrate_tau, default_learnable, descend, generate_mitigated,
                             mitigate_pipeline_prompts, mitigate_prompt_embeds)
from memreg.score import AnisotropyScore, ddim_timesteps, pure_noise_latents

MEMORIZED = "a photo of the rocket on the moon"
ORDINARY = ["a red circle", "a dog in the garden", "old house near the river", "a blue square on a white background",
            "two cats on a table", "the sea at sunset", "a man with a book", "a green tree"]


@pytest.fixture(scope="module")
def planted(eps_components):
    """A copy of the tiny UNet fine-tuned for 60 steps so that MEMORIZED reproduces one fixed latent
    while ORDINARY captions and the empty prompt see fresh random latents (a planted memorization)."""
    comps = eps_components
    enc = PromptEncoder(comps.tokenizer, comps.text_encoder)
    c_mem, uncond = enc.encode([MEMORIZED]).embeds, enc.uncond()
    others = torch.cat([uncond, enc.encode(ORDINARY).embeds])
    unet = copy.deepcopy(comps.unet).train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 16, 16, generator=g)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    for _ in range(60):
        noise = torch.randn(8, 4, 16, 16, generator=g)
        t = torch.randint(0, 1000, (8,), generator=g)
        x = torch.cat([x0.expand(4, -1, -1, -1), torch.randn(4, 4, 16, 16, generator=g)])
        c = torch.cat([c_mem.expand(4, -1, -1), others[torch.randint(0, len(others), (4,), generator=g)]])
        loss = torch.nn.functional.mse_loss(unet(comps.scheduler.add_noise(x, noise, t), t, encoder_hidden_states=c).sample,
                                            noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval().requires_grad_(False)
    return unet, comps.scheduler, c_mem, uncond, enc.encode(ORDINARY).embeds


def mean_score(unet, scheduler, cond, uncond, seeds=range(100, 104)):
    """Independent check: the paper's score per row, averaged over fixed noise seeds."""
    scorer = AnisotropyScore(unet, scheduler, preset="sd1")
    with torch.no_grad():
        return torch.stack([scorer(pure_noise_latents(unet, cond.shape[0], torch.Generator().manual_seed(s)),
                                   cond, uncond).score for s in seeds]).mean(0)


def test_below_tau_rows_are_bit_identical_and_flagged_rows_keep_bos(planted):
    unet, sched, c_mem, uncond, c_ord = planted
    cond = torch.cat([c_ord[:2], c_mem])
    untouched = mitigate_prompt_embeds(unet, sched, cond, uncond, [0, 1, 2], MitigationConfig(tau=1e9))
    assert torch.equal(untouched.embeds, cond)
    assert [r.flagged for r in untouched.records] == [False] * 3 and all(r.steps == 0 for r in untouched.records)
    # one flagged row among unflagged ones: only it changes, and never at BOS
    tau = max(untouched.records[0].score_before, untouched.records[1].score_before) + 1e-3
    assert untouched.records[2].score_before > tau
    res = mitigate_prompt_embeds(unet, sched, cond, uncond, [0, 1, 2], MitigationConfig(tau=tau))
    assert [r.flagged for r in res.records] == [False, False, True]
    assert torch.equal(res.embeds[:2], cond[:2])
    assert torch.equal(res.embeds[2, 0], cond[2, 0])
    assert not torch.equal(res.embeds[2, 1:], cond[2, 1:])


def test_planted_memorized_prompt_score_falls_under_tau(planted):
    unet, sched, c_mem, uncond, c_ord = planted
    before_mem = mean_score(unet, sched, c_mem, uncond)
    before_ord = mean_score(unet, sched, c_ord, uncond)
    assert before_mem.item() > before_ord.max().item() + 1.0  # the planting worked
    tau = float(before_ord.max())
    res = mitigate_prompt_embeds(unet, sched, c_mem, uncond, [0], MitigationConfig(tau=tau, max_steps=30))
    rec = res.records[0]
    assert rec.flagged and rec.score_before > tau and rec.score_after <= tau and 1 <= rec.steps <= 30
    after_mem = mean_score(unet, sched, res.embeds, uncond)  # fresh seeds, not the ones descended on
    assert after_mem.item() < 0.75 * before_mem.item()


def test_target_below_tau_descends_further_and_only_flagged_rows_move(planted):
    unet, sched, c_mem, uncond, c_ord = planted
    cond = torch.cat([c_mem, c_ord[:1]])
    first = mitigate_prompt_embeds(unet, sched, cond, uncond, [0, 1], MitigationConfig(tau=1e9))
    ordinary, memorized = first.records[1].score_before, first.records[0].score_before
    tau = ordinary + 1e-3  # the ordinary row sits just under tau, above the target: it must not move
    at_tau = mitigate_prompt_embeds(unet, sched, cond, uncond, [0, 1], MitigationConfig(tau=tau, max_steps=40))
    target = min(ordinary, at_tau.records[0].score_after) - 0.3  # below where stopping at tau left it
    deeper = mitigate_prompt_embeds(unet, sched, cond, uncond, [0, 1],
                                    MitigationConfig(tau=tau, target=target, max_steps=40))
    assert memorized > tau
    assert torch.equal(deeper.embeds[1], cond[1]) and not deeper.records[1].flagged and deeper.records[1].steps == 0
    assert at_tau.records[0].score_after <= tau and deeper.records[0].score_after <= target
    assert deeper.records[0].steps > at_tau.records[0].steps
    with pytest.raises(ValueError, match="must be <= tau"):
        MitigationConfig(tau=1.0, target=1.5).check()


def test_step_budget_and_one_unet_call_per_step(planted):
    unet, sched, c_mem, uncond, c_ord = planted
    cond = torch.cat([c_mem, c_ord[:2]])
    calls = []
    handle = unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        res = mitigate_prompt_embeds(unet, sched, cond, uncond, [3, 4, 5],
                                     MitigationConfig(tau=-1e9, max_steps=3, draws=1))
        assert [r.steps for r in res.records] == [3, 3, 3]
        assert calls == [12, 12, 12, 12]  # max_steps + 1 evaluations, 4 UNet samples per prompt each
        # the planted prompt keeps running after the ordinary ones stop: they leave the batch
        calls.clear()
        tau = max(r.score_before for r in res.records[1:]) + 1e-3
        res = mitigate_prompt_embeds(unet, sched, cond, uncond, [3, 4, 5],
                                     MitigationConfig(tau=tau, max_steps=2, draws=2))
        assert [r.steps for r in res.records] == [2, 0, 0]
        assert calls == [24, 8, 8]
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["score", "wen"])
def test_batch_equals_one_by_one(planted, mode):
    unet, sched, c_mem, uncond, c_ord = planted
    cond = torch.cat([c_ord[:1], c_mem, c_ord[1:2]])
    seeds = [11, 12, 13]
    base = mitigate_prompt_embeds(unet, sched, cond, uncond, seeds,
                                  MitigationConfig(mode=mode, tau=-1e9, max_steps=0, draws=2))
    tau = max(base.records[0].score_before, base.records[2].score_before) + 1e-3
    cfg = MitigationConfig(mode=mode, tau=tau, max_steps=4, draws=2)
    batch = mitigate_prompt_embeds(unet, sched, cond, uncond, seeds, cfg)
    assert [r.flagged for r in batch.records] == [False, True, False]
    for i in range(3):
        one = mitigate_prompt_embeds(unet, sched, cond[i:i + 1], uncond, seeds[i:i + 1], cfg)
        assert one.records[0].steps == batch.records[i].steps
        assert one.records[0].score_after == pytest.approx(batch.records[i].score_after, rel=1e-4, abs=1e-5)
        torch.testing.assert_close(one.embeds[0], batch.embeds[i], rtol=0, atol=1e-5)
    again = mitigate_prompt_embeds(unet, sched, cond, uncond, seeds, cfg)
    assert torch.equal(again.embeds, batch.embeds)  # deterministic given the seeds


def test_wen_is_first_step_guidance_norm_and_one_adamw_step(planted):
    """Wen's loss and update, recomputed by hand: ||eps_c - eps_u|| at the first DDIM step on the
    generation's starting noise, then AdamW(lr 0.05, wd 0.01) whose first step is
    p * (1 - lr * wd) - lr * g / (|g| + eps), with BOS fixed."""
    unet, sched, c_mem, uncond, _ = planted
    cfg = MitigationConfig(mode="wen", tau=-1e9, max_steps=1, num_inference_steps=20)
    res = mitigate_prompt_embeds(unet, sched, c_mem, uncond, [7], cfg)
    t = ddim_timesteps(sched.config, 20)[0]
    x = initial_latents(unet, [7])
    p = c_mem.clone().requires_grad_(True)
    out = unet(torch.cat([x, x]), torch.tensor([t, t]), encoder_hidden_states=torch.cat([uncond, p])).sample
    loss = torch.sqrt(((out[1] - out[0]) ** 2).sum())
    (grad,) = torch.autograd.grad(loss, [p])
    assert res.records[0].score_before == pytest.approx(loss.item(), rel=1e-5)
    expected = c_mem * (1 - 0.05 * 0.01) - 0.05 * grad / (grad.abs() + 1e-8)
    expected[:, 0] = c_mem[:, 0]
    torch.testing.assert_close(res.embeds, expected, rtol=1e-5, atol=1e-6)
    assert res.records[0].steps == 1


def test_calibrate_tau_is_the_quantile_of_ordinary_scores(eps_components):
    pipe = build_pipeline(eps_components)
    tau = calibrate_tau(pipe, ORDINARY, MitigationConfig(draws=1), quantile=0.75, seeds=range(20, 28), batch_size=3)
    enc = PromptEncoder(eps_components.tokenizer, eps_components.text_encoder)
    scorer = AnisotropyScore(eps_components.unet, eps_components.scheduler, preset="sd1")
    with torch.no_grad():
        vals = [scorer(pure_noise_latents(eps_components.unet, 1, torch.Generator().manual_seed(20 + i)),
                       enc.encode([p]).embeds, enc.uncond()).score.item() for i, p in enumerate(ORDINARY)]
    assert tau == pytest.approx(float(np.quantile(vals, 0.75)), rel=1e-5)


def test_padding_stays_when_move_padding_is_off(eps_components):
    pipe = build_pipeline(eps_components)
    prompts = ["a dog", "a red circle on a blue background"]
    cond, _ = pipe.encode_prompt(prompts, pipe.device, 1, True)
    n_tok = [len(ids) for ids in eps_components.tokenizer(prompts).input_ids]
    mit = mitigate_pipeline_prompts(pipe, prompts, [0, 1], MitigationConfig(tau=-1e9, max_steps=2, move_padding=False))
    for i, n in enumerate(n_tok):
        assert torch.equal(mit.prompt_embeds[i, n:], cond[i, n:]) and torch.equal(mit.prompt_embeds[i, 0], cond[i, 0])
        assert not torch.equal(mit.prompt_embeds[i, 1:n], cond[i, 1:n])
    mask = default_learnable(cond, n_tok)
    assert mask[0].tolist()[: n_tok[0] + 1] == [False] + [True] * (n_tok[0] - 1) + [False]


def test_v_prediction_model(v_components):
    pipe = build_pipeline(v_components)
    prompts = ["a dog", "a green tree"]
    for mode in ("score", "wen"):
        mit = mitigate_pipeline_prompts(pipe, prompts, [0, 1], MitigationConfig(mode=mode, tau=-1e9, max_steps=2))
        assert all(r.flagged and r.steps == 2 and math.isfinite(r.score_after) for r in mit.records)
        kept = mitigate_pipeline_prompts(pipe, prompts, [0, 1], MitigationConfig(mode=mode, tau=1e9))
        cond, _ = pipe.encode_prompt(prompts, pipe.device, 1, True)
        assert torch.equal(kept.prompt_embeds, cond)


def test_drop_in_for_a_pipeline_with_lora(tiny_sd_eps):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_eps), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # deterministic sampling
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    prompts = ["a dog", "a green tree"]
    latents = initial_latents(pipe.unet, [0, 1])
    mit = mitigate_pipeline_prompts(pipe, prompts, [0, 1], MitigationConfig(tau=-1e9, max_steps=2))
    assert all(p.grad is None for p in pipe.unet.parameters())
    imgs = pipe(prompt_embeds=mit.prompt_embeds, negative_prompt_embeds=mit.negative_prompt_embeds, latents=latents,
                num_inference_steps=3, output_type="np").images
    assert imgs.shape == (2, 32, 32, 3) and np.isfinite(imgs).all()
    # below tau the embeddings are the pipeline's own: same images as pipe(prompt=...)
    kept = mitigate_pipeline_prompts(pipe, prompts, [0, 1], MitigationConfig(tau=1e9))
    a = pipe(prompt_embeds=kept.prompt_embeds, negative_prompt_embeds=kept.negative_prompt_embeds, latents=latents,
             num_inference_steps=3, output_type="np").images
    b = pipe(prompt=prompts, latents=latents, num_inference_steps=3, output_type="np").images
    assert np.array_equal(a, b)


def test_generate_mitigated_none_equals_generate_images(eps_components):
    prompts, seeds = ["a dog", "a green tree", "a red circle"], [5, 6, 7]
    res = generate_mitigated(eps_components, prompts, seeds, "none", MitigationConfig(num_inference_steps=4),
                             batch_size=2)
    ref = generate_images(eps_components, prompts, seeds, num_inference_steps=4, batch_size=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(res.images, ref))
    assert [r.flagged for r in res.records] == [False] * 3 and res.records[1].seed == 6
    mit = generate_mitigated(eps_components, prompts, seeds, "score", MitigationConfig(tau=-1e9, max_steps=1,
                                                                                       num_inference_steps=4))
    assert len(mit.images) == 3 and all(r.steps == 1 for r in mit.records)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(mit.images, ref))


def test_descent_defaults_follow_the_mode_and_given_values_stay(planted):
    # wen keeps the published rule (10 iterations at lr 0.05, stop at the first loss under tau); score
    # takes 20 at lr 0.1 and stops on two evaluations in a row; none does not descend
    def descent(c):
        return c.max_steps, c.lr, c.stop_streak
    assert descent(MitigationConfig(mode="wen").check()) == (10, 0.05, 1)
    score = MitigationConfig(mode="score")
    assert descent(score.check()) == (20, 0.1, 2)
    assert descent(score) == (None, None, None)                 # check() fills a copy
    assert descent(replace(score, mode="wen").check()) == (10, 0.05, 1)   # so one config serves another mode
    assert MitigationConfig(mode="none").check().max_steps == 0
    assert descent(MitigationConfig(mode="wen", max_steps=3, lr=0.2, stop_streak=3).check()) == (3, 0.2, 3)
    with pytest.raises(ValueError, match="stop_streak >= 1"):
        MitigationConfig(stop_streak=0).check()
    # the defaults are what the descent runs: a prompt that never reaches tau stops after 20 updates
    unet, sched, c_mem, uncond, _ = planted
    res = mitigate_prompt_embeds(unet, sched, c_mem, uncond, [0], MitigationConfig(tau=-1e9, draws=1))
    assert res.records[0].steps == 20


class ScriptedObjective:
    """Criterion values fixed by hand, one list per prompt and step (the embedding enters with weight 0,
    so the descent has a graph to differentiate); records the rows evaluated at each step."""

    def __init__(self, values):
        self.values, self.k, self.rows = values, 0, []

    def __call__(self, embeds, rows):
        self.rows.append(list(rows))
        out = torch.tensor([self.values[i][self.k] for i in rows]) + 0 * embeds.sum(dim=(1, 2))
        self.k += 1
        return out


def test_a_flagged_prompt_stops_after_stop_streak_evaluations_in_a_row_under_the_target():
    # tau 1, target 0.5 (values exact in float32). Prompt 0: 2 (flagged), 0.25 (under), 0.75 (over: the
    # streak restarts), 0.375, 0.125, 0.0625. Prompt 1: 0.875, under tau at step 0: not flagged, never
    # moves. Prompt 2: 3 then always over the target.
    values = [[2.0, 0.25, 0.75, 0.375, 0.125, 0.0625], [0.875] * 6, [3.0, 0.875, 0.875, 0.875, 0.875, 0.875]]
    cond = torch.randn(3, 4, 2)
    mask = default_learnable(cond)
    for streak, stop_step in ((1, 1), (2, 4), (3, 5)):
        objective = ScriptedObjective(values)
        cfg = MitigationConfig(tau=1.0, target=0.5, max_steps=5, stop_streak=streak).check()
        out, records = descend(objective, cond, mask, cfg)
        assert [r.flagged for r in records] == [True, False, True]
        assert records[0].steps == stop_step and records[0].score_after == values[0][stop_step]
        assert records[1].steps == 0 and torch.equal(out[1], cond[1])
        assert records[2].steps == 5 and records[2].score_after == 0.875       # ran its budget
        assert objective.rows[0] == [0, 1, 2] and all(r == [0, 2] for r in objective.rows[1:stop_step + 1])


def test_bad_settings_are_rejected(planted):
    unet, sched, c_mem, uncond, _ = planted
    with pytest.raises(ValueError, match="needs a threshold"):
        mitigate_prompt_embeds(unet, sched, c_mem, uncond, [0], MitigationConfig())
    with pytest.raises(ValueError, match="mode must be one of"):
        MitigationConfig(mode="fast").check()
    with pytest.raises(ValueError, match="1 embeddings, 2 seeds"):
        mitigate_prompt_embeds(unet, sched, c_mem, uncond, [0, 1], MitigationConfig(tau=1.0))
