"""The anisotropy gate's parts (memreg/guards/anisotropy_gate/): hand-computed losses, gradients, fused
forward, RNG isolation, calibration."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memreg.encoding import PromptEncoder
from memreg.guards.anisotropy_gate.config import AnisotropyGateConfig
from memreg.guards.anisotropy_gate.loss import bound_force, penalty
from memreg.guards.anisotropy_gate.probes import PROBE_MEMORY_SHARE, ProbeSampler, auto_probe_checkpointing
from memreg.guards.anisotropy_gate.threshold import AbsoluteThreshold, Calibration, Calibrator
from memreg.score import AnisotropyScore, make_scorer


class _FakeScorer:
    """Only what the loss path needs: g1 (the unit tests feed values directly)."""

    g1 = 1.0


class _Pen:
    """The absolute threshold's loss path as the guard wires it, from a validated config."""

    def __init__(self, scorer=None, seed: int = 0, **kw):
        cfg = AnisotropyGateConfig(**{"reference": "none", **kw})
        self.mode = cfg.mode
        self.calibrator = Calibrator.from_config(cfg)
        self.threshold = AbsoluteThreshold.from_config(cfg, self.calibrator)
        self.probes = ProbeSampler.from_config(cfg, scorer or _FakeScorer(), seed=seed, process_index=0)

    def penalty(self, values):
        verdict = self.threshold.compare(values)
        return penalty(self.mode, verdict), verdict.over

    def compute(self, out, probe) -> SimpleNamespace:
        values, norm = self.probes.values_from_output(out, probe.latents)
        loss, over = self.penalty(values)
        return SimpleNamespace(loss=loss, values=values.detach(), norm=norm.detach(), over=over)

    def calibrate(self, prompts, encode, uncond, latent_shape) -> Calibration:
        return self.calibrator.calibrate_from_values(*self.probes.score_sample(prompts, encode, uncond, latent_shape))

    def state_dict(self) -> dict:
        return {**self.probes.state_dict(), **self.calibrator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.probes.load_state_dict(state)
        self.calibrator.load_state_dict(state)


def _pen(**kw) -> _Pen:
    kw.setdefault("zscore", "none")
    return _Pen(**kw)


def test_hinge_equals_hand_computation():
    pen = _pen(mode="hinge", tau=2.5)
    s = torch.tensor([1.0, 2.0, 3.0, 4.5])
    loss, over = pen.penalty(s)
    # relu([-1.5, -0.5, 0.5, 2.0]) = [0, 0, 0.5, 2.0] -> mean 2.5 / 4
    assert loss.item() == pytest.approx(0.625)
    assert over.tolist() == [False, False, True, True]


def test_mean_mode_equals_hand_computation():
    pen = _pen(mode="mean", tau=100.0)
    loss, _ = pen.penalty(torch.tensor([1.0, 2.0, 6.0]))
    assert loss.item() == pytest.approx(3.0)


def test_hinge_zero_below_tau_and_gradient_above():
    pen = _pen(mode="hinge", tau=1.0)
    below = torch.tensor([0.2, 0.9, 1.0], requires_grad=True)
    loss, _ = pen.penalty(below)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(below.grad) == 0
    above = torch.tensor([0.5, 1.5, 3.0], requires_grad=True)
    loss, _ = pen.penalty(above)
    loss.backward()
    assert loss.item() == pytest.approx((0.5 + 2.0) / 3)
    assert above.grad.tolist() == pytest.approx([0.0, 1 / 3, 1 / 3])


def test_zscore_calib_by_hand():
    pen = _pen(mode="hinge", tau=3.0, zscore="calib")
    pen.calibrator.set_calibration(Calibration(tau=3.0, mu=1.0, sigma=2.0, ref_norm=1.0, num_values=10, quantile=0.95,
                                    frac_over=0.1))
    s = torch.tensor([2.0, 5.0], requires_grad=True)
    loss, over = pen.penalty(s)
    # z = (s - 1) / 2 = [0.5, 2.0]; threshold (3 - 1) / 2 = 1.0 -> relu = [0, 1.0] -> 0.5
    assert loss.item() == pytest.approx(0.5)
    assert over.tolist() == [False, True]
    loss.backward()
    assert s.grad.tolist() == pytest.approx([0.0, 0.25])


def test_zscore_batch_by_hand():
    pen = _pen(mode="hinge", tau=0.0, zscore="batch", tau_z=0.5, probes_per_step=4)
    s = torch.tensor([0.0, 0.0, 0.0, 4.0])
    loss, over = pen.penalty(s)
    mu, sd = 1.0, math.sqrt(3.0)  # population std of [0, 0, 0, 4]
    z = [(v - mu) / sd for v in s.tolist()]
    assert loss.item() == pytest.approx(sum(max(x - 0.5, 0.0) for x in z) / 4)
    assert over.tolist() == [False, False, False, True]


def test_weight_zero_gives_zero_weighted_penalty_and_schedule():
    pen = _pen(mode="hinge", tau=0.0, weight=0.0, every_n_steps=3, warmup_steps=3)
    assert [s for s in range(10) if pen.probes.active(s)] == [3, 6, 9]


def test_update_tau_ema_by_hand():
    pen = _pen(tau=1.0, tau_ema=0.25, tau_quantile=0.5)
    pen.calibrator.update_tau(torch.tensor([1.0, 2.0, 3.0]))  # median 2.0
    assert pen.calibrator.tau == pytest.approx(0.75 * 1.0 + 0.25 * 2.0)


def test_cond_ratio_by_hand():
    pen = _pen(tau=1.0)
    pen.calibrator.set_calibration(Calibration(tau=1.0, mu=0, sigma=1, ref_norm=0.5, num_values=4, quantile=0.95,
                                               frac_over=0))
    r = pen.calibrator.cond_ratio(torch.tensor([0.5, 0.8, 2.0]), torch.tensor([0.2, 0.4, 9.0]))
    assert r == pytest.approx(((0.2 + 0.4) / 2) / 0.5)
    assert math.isnan(pen.calibrator.cond_ratio(torch.tensor([3.0]), torch.tensor([1.0])))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode"):
        _pen(mode="square")
    with pytest.raises(ValueError, match="tau"):
        _pen(tau="high")


# ---------------------------------------------------------------------------- with the tiny UNet

@pytest.fixture(scope="module")
def scorer_setup(eps_components):
    comps = eps_components
    scorer = make_scorer(comps.unet, comps.scheduler)
    enc = PromptEncoder(comps.tokenizer, comps.text_encoder)
    return comps, scorer, enc


def test_make_scorer_presets(eps_components, v_components):
    assert (make_scorer(eps_components.unet, eps_components.scheduler).g2) == 2.0
    assert (make_scorer(v_components.unet, v_components.scheduler).g2) == 0.1


@pytest.mark.parametrize("term", ["combined", "norm", "align"])
def test_fused_forward_probe_part_equals_scorer(scorer_setup, term):
    comps, scorer, enc = scorer_setup
    pen = _Pen(scorer, probes_per_step=2, every_n_steps=1, term=term, tau=0.0, zscore="none", seed=3)
    embeds = enc.encode(["a red circle", "a blue square", "a green star"]).embeds
    uncond = enc.uncond()
    latent_shape = (4, 16, 16)
    probe = pen.probes.prepare(embeds, uncond, latent_shape, step=0)
    assert probe.size == 2 * (4 if term == "combined" else 2)
    # a denoising batch in front, as the training loop builds it
    noisy = torch.randn(3, *latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 900])
    with torch.no_grad():
        out = comps.unet(torch.cat([noisy, probe.sample]), torch.cat([t, probe.timesteps]),
                         encoder_hidden_states=torch.cat([embeds, probe.embeds])).sample
        pout = pen.compute(out[3:], probe)
        direct = scorer(probe.latents, embeds[probe.index], uncond)
        alone = comps.unet(noisy, t, encoder_hidden_states=embeds).sample
    expected = {"combined": direct.score, "norm": scorer.g1 * direct.norm, "align": scorer.g2 * direct.align}[term]
    assert torch.allclose(pout.values, expected, atol=1e-5)
    if term == "align":  # the reported norm is the guidance norm at t_lo, by hand
        lat, c = probe.latents, embeds[probe.index]
        with torch.no_grad():
            t_lo = torch.full((2,), scorer.t_lo)
            g = (comps.unet(lat, t_lo, encoder_hidden_states=c).sample
                 - comps.unet(lat, t_lo, encoder_hidden_states=uncond.expand(2, -1, -1)).sample)
        assert torch.allclose(pout.norm, g.flatten(1).norm(dim=1), atol=1e-5)
    else:
        assert torch.allclose(pout.norm, direct.norm, atol=1e-5)
    assert torch.allclose(out[:3], alone, atol=1e-5)  # the denoising part is unchanged by the probes


def test_penalty_has_gradient_through_unet(scorer_setup):
    comps, scorer, enc = scorer_setup
    pen = _Pen(scorer, probes_per_step=1, every_n_steps=1, tau=0.0, zscore="none", seed=0)
    embeds = enc.encode(["a red circle"]).embeds
    probe = pen.probes.prepare(embeds, enc.uncond(), (4, 16, 16), step=0)
    w = comps.unet.conv_out.weight
    w.requires_grad_(True)
    try:
        out = comps.unet(probe.sample, probe.timesteps, encoder_hidden_states=probe.embeds).sample
        pout = pen.compute(out, probe)
        assert pout.loss.item() > 0
        pout.loss.backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
    finally:
        w.requires_grad_(False)
        w.grad = None


def test_probes_never_touch_the_global_rng(scorer_setup):
    comps, scorer, enc = scorer_setup
    pen = _Pen(scorer, probes_per_step=2, every_n_steps=1, tau="auto", calibration_prompts=3,
                              calibration_seeds=1, seed=0)
    embeds = enc.encode(["a red circle", "a blue square"]).embeds
    torch.manual_seed(123)
    before = torch.get_rng_state()
    pen.calibrate(["a red circle", ["a blue square", "a cat"], "a dog"], lambda c: enc.encode(c).embeds,
                  enc.uncond(), (4, 16, 16))
    pen.probes.prepare(embeds, enc.uncond(), (4, 16, 16), step=0)
    assert torch.equal(before, torch.get_rng_state())


def test_calibration_tau_is_the_quantile_of_hand_scored_draws(scorer_setup):
    comps, scorer, enc = scorer_setup
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a white ring"]
    pen = _Pen(scorer, tau="auto", tau_quantile=0.8, calibration_prompts=4, calibration_seeds=2, seed=5)
    cal = pen.calibrate(prompts, lambda c: enc.encode(c).embeds, enc.uncond(), (4, 16, 16))
    # Independent re-derivation of the documented draw protocol: generator(seed) -> randperm -> noise per seed.
    gen = torch.Generator().manual_seed(5)
    chosen = [prompts[i] for i in torch.randperm(len(prompts), generator=gen)[:4].tolist()]
    cond = enc.encode(chosen).embeds
    scores, norms = [], []
    for _ in range(2):
        x = torch.randn((4, 4, 16, 16), generator=gen)
        with torch.no_grad():
            so = scorer(x, cond, enc.uncond())
        scores += so.score.tolist()
        norms += so.norm.tolist()
    scores, norms = np.array(scores), np.array(norms)
    tau = np.quantile(scores, 0.8)
    assert cal.tau == pytest.approx(tau, rel=1e-5)
    assert pen.calibrator.tau == pytest.approx(tau, rel=1e-5)
    assert cal.mu == pytest.approx(scores.mean(), rel=1e-5)
    assert cal.sigma == pytest.approx(scores.std(), rel=1e-4)
    assert cal.ref_norm == pytest.approx(norms[scores <= tau].mean(), rel=1e-5)
    assert cal.num_values == 8


def test_state_dict_roundtrip_restores_generator_and_tau(scorer_setup):
    comps, scorer, enc = scorer_setup
    embeds = enc.encode(["a red circle", "a blue square"]).embeds
    a = _Pen(scorer, probes_per_step=1, every_n_steps=1, tau=0.7, tau_ema=0.5, zscore="none", seed=1)
    a.probes.prepare(embeds, enc.uncond(), (4, 16, 16), step=0)
    a.calibrator.update_tau(torch.tensor([2.0]))
    state = a.state_dict()
    b = _Pen(scorer, probes_per_step=1, every_n_steps=1, tau=0.7, tau_ema=0.5, zscore="none", seed=99)
    b.load_state_dict(state)
    assert b.calibrator.tau == a.calibrator.tau
    pa = a.probes.prepare(embeds, enc.uncond(), (4, 16, 16), step=1)
    pb = b.probes.prepare(embeds, enc.uncond(), (4, 16, 16), step=1)
    assert torch.equal(pa.latents, pb.latents) and torch.equal(pa.index, pb.index)


def test_auto_probe_checkpointing_only_when_probes_would_grow_memory_past_the_share():
    assert PROBE_MEMORY_SHARE == 0.2
    assert not auto_probe_checkpointing(2, 32, False)    # 2 / 32 = 6% more activations: no recompute
    assert not auto_probe_checkpointing(6, 32, False)    # 18.75%
    assert auto_probe_checkpointing(8, 32, False)        # 25%: recompute on probe steps
    assert auto_probe_checkpointing(2, 1, False)         # SD LoRA at batch 1: probes triple the activations
    assert not auto_probe_checkpointing(8, 1, True)      # the run checkpoints anyway


class _EpsScorer:
    """The real score arithmetic on a hand-made UNet output (no UNet): eps prediction, alphas given."""

    def __new__(cls):
        sched = SimpleNamespace(alphas_cumprod=torch.linspace(0.99, 0.01, 1000),
                                config=SimpleNamespace(num_train_timesteps=1000, prediction_type="epsilon"))
        scorer = AnisotropyScore.__new__(AnisotropyScore)
        scorer.t_hi, scorer.t_lo, scorer.g1, scorer.g2 = 999, 41, 1.0, 2.0
        scorer.alphas_cumprod, scorer.prediction_type, scorer.space = sched.alphas_cumprod.double(), "epsilon", "eps"
        return scorer


@pytest.mark.parametrize("grad_through", ["cond", "both"])
def test_grad_through_decides_which_predictions_the_penalty_moves(grad_through):
    """[u@t_hi, c@t_hi, u@t_lo, c@t_lo] for 2 probes: with grad_through=cond the unconditional rows
    (shared by every caption) get exactly zero gradient; the values are the same either way."""
    pen = _Pen(_EpsScorer(), zscore="none", tau=0.0, term="combined", grad_through=grad_through)
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(8, 4, 3, 3, generator=gen, requires_grad=True)
    latents = torch.randn(2, 4, 3, 3, generator=gen)
    values, _ = pen.probes.values_from_output(out, latents)
    # by hand: norm = ||c_hi - u_hi||; the align term is the same cosine as in memreg.score
    u_hi, c_hi = out[0:2].detach(), out[2:4].detach()
    norm = (c_hi - u_hi).flatten(1).norm(dim=1)
    u_lo, c_lo = out[4:6].detach(), out[6:8].detach()
    align = torch.nn.functional.cosine_similarity(u_lo, c_lo - u_lo, dim=1).mean(dim=(1, 2))
    assert values.detach().tolist() == pytest.approx((norm + 2 * align).tolist(), rel=1e-5)
    values.sum().backward()
    grad = out.grad.flatten(1).abs().sum(dim=1)
    assert (grad[[2, 3, 6, 7]] > 0).all()
    if grad_through == "cond":
        assert grad[[0, 1, 4, 5]].tolist() == [0.0] * 4
    else:
        assert (grad[[0, 1, 4, 5]] > 0).all()


def test_grad_through_is_checked():
    with pytest.raises(ValueError, match="grad_through"):
        _pen(grad_through="uncond")


def test_bound_force_by_hand():
    """penalty = w * sum(p): gradient w per element, norm w * sqrt(n); mse = mean(m^2): gradient 2m/N."""
    p = torch.ones(2, 3, requires_grad=True)
    m = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    mse = m.pow(2).mean()                       # gradient 2m/4: [[1.5, 2], [0, 0]], norm 2.5
    pen = 0.5 * p.sum()                         # gradient 0.5 everywhere, norm 0.5 * sqrt(6)
    ratio = 0.5 * 6 ** 0.5 / 2.5
    capped, got = bound_force(pen, p, mse, m, max_force=0.1)
    assert got == pytest.approx(ratio)
    assert capped.item() == pytest.approx(pen.item() * 0.1 / ratio)
    capped.backward()
    assert p.grad.norm().item() == pytest.approx(0.1 * 2.5)   # the capped pull is 0.1x the denoising one
    free, got = bound_force(0.5 * p.sum(), p, m.pow(2).mean(), m, max_force=10.0)
    assert got == pytest.approx(ratio) and free.item() == pytest.approx(3.0)   # under the cap: untouched
    zero, got = bound_force(0.0 * p.sum(), p, m.pow(2).mean(), m, max_force=0.1)
    assert got == 0.0 and zero.item() == 0.0
