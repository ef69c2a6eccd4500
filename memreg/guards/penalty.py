"""``guard.type: penalty``: the anisotropy score of a few batch captions, added to the MSE loss.

:class:`PenaltyGuard` puts :class:`MemorizationPenalty` (the loss math) behind the guard protocol
of :mod:`memreg.guards.base`; its settings are :class:`PenaltyConfig` (the top-level ``guard.*`` keys).

Each active optimizer step, :class:`MemorizationPenalty` takes ``k`` captions of the current batch,
draws pure-noise latents from its **own** ``torch.Generator`` (the training RNG stream is never
touched, so ``weight=0`` reproduces the plain run), and builds the scorer's UNet batch
``[u@t_hi, c@t_hi, u@t_lo, c@t_lo]`` (``term="norm"``: the ``t_hi`` half only; ``term="align"``: the
``t_lo`` half only, penalising ``g2 * align``, for models where the alignment term is the one that
rises with memorization). The training loop concatenates it onto the denoising batch
(:meth:`PenaltyGuard.extra_inputs`), runs ONE UNet forward, splits the output and hands the probe
part back (:meth:`PenaltyGuard.loss` -> :meth:`MemorizationPenalty.compute`, whose values come from
``memreg.score``'s ``from_unet_output``); gradients flow through the score. Calibration and the
final report score captions with ``memreg.score.score_prompts``.

Loss on the per-probe value ``s`` (the score, or ``g1 * norm`` for ``term="norm"``):

* ``mode="hinge"``: ``mean(relu(z(s) - z(tau)))``; ``mode="mean"``: ``mean(z(s))``;
* ``zscore``: ``"none"`` z(s) = s; ``"calib"`` z(s) = (s - mu) / sigma with mu, sigma of the
  calibration scores (makes ``weight`` unit-free across models); ``"batch"`` z over the step's
  probes (gathered across processes; the hinge threshold is then ``tau_z``).

Selectivity: ``tau="auto"`` calibrates tau once before training as the ``tau_quantile`` quantile
(default 0.95: the upper tail) of single-draw scores of a sample of training captions under the
base model, so ordinary captions sit below it and feel no gradient. ``cond_ratio`` (mean guidance
norm of probes under tau / the same at calibration) is the scalar that shows ordinary conditioning
survives; ``tau_ema`` > 0 lets tau track the q-quantile of the probes as training moves.

Per-caption reference (``guard.reference``: base | population | base+population; ``none`` is the
absolute tau above): the hinge acts on a caption's growth over its base-model value on the same
probe noise and/or above a running robust threshold of all captions' latest probes, see
:mod:`memreg.guards.reference`. ``term: auto`` means ``norm`` there. Every mode logs the firing
rate of duplicated vs ordinary captions (``guard/fire_rate/<group>``) when the context knows the
duplicated captions and the guard saw the batch captions (:meth:`PenaltyGuard.captions`).

The defaults (README: measured on two data seeds, full fine-tuning and LoRA): ``reference:
base+population``, the caption gate (``guard.gate``, :mod:`memreg.guards.gate`: a caption whose
probe fires leaves the denoising loss of every later batch) and ``weight: 0``, so the probes run in a
no-grad forward and only decide; a weight above 0 also adds the hinge, whose gradient pushes the
probed norm back under the threshold and so hides the caption from the gate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from memreg import log_tags as tags
from memreg.guards.base import ExtraInputs, Guard, GuardBatch, GuardContext, GuardLoss, quantile
from memreg.guards.gate import CaptionGate, caption_keys
from memreg.guards.reference import REFERENCES, SOURCES, Reference, caption_latents, distinct_captions, fire_rates
from memreg.score import AnisotropyScore, score_prompts

logger = logging.getLogger(__name__)

MODES = ("hinge", "mean")
TERMS = ("combined", "norm", "align")
ZSCORES = ("none", "calib", "batch")
GRAD_THROUGH = ("cond", "both")


def make_scorer(unet, scheduler, preset: str | None = None, t_hi: int | None = None, t_lo: int | None = None,
                prediction_type: str | None = None) -> AnisotropyScore:
    """The paper's scorer for this model: preset sd2 for v-prediction models, sd1 otherwise."""
    pt = prediction_type or scheduler.config.prediction_type
    preset = preset or ("sd2" if pt == "v_prediction" else "sd1")
    return AnisotropyScore(unet, scheduler, t_hi=t_hi, t_lo=t_lo, preset=preset, prediction_type=pt)


@dataclass
class ProbeBatch:
    latents: Tensor      # (k, C, H, W) float32 pure noise
    sample: Tensor       # UNet inputs to concatenate onto the denoising batch
    timesteps: Tensor
    embeds: Tensor
    index: Tensor        # rows of the batch whose captions were probed
    captions: list[str] | None = None   # the probed captions (when the guard was given the batch's)
    base: Tensor | None = None          # reference modes: (k,) base values on the same noise (0: population)
    known: Tensor | None = None         # reference modes: (k,) bool, a base value exists for the caption
    keys: Tensor | None = None          # (k,) int64 caption keys (memreg.guards.gate.caption_keys)

    @property
    def size(self) -> int:
        return self.sample.shape[0]


@dataclass
class PenaltyOutput:
    loss: Tensor         # unweighted penalty, scalar with grad
    weighted: Tensor     # weight * loss
    values: Tensor       # (k,) penalised values (score or g1*norm), detached
    norm: Tensor         # (k,) guidance norms, detached
    over: Tensor         # (k,) bool: value above tau (reference modes: quantity above the threshold)
    growth: Tensor | None = None     # reference modes: (k,) value - base value, detached (nan: no base)
    duplicated: Tensor | None = None # (k,) bool: the probed caption belongs to a duplicated image
    keys: Tensor | None = None       # caption keys of every process's probes, gathered for the gate/population
    force: float = 0.0               # guard.max_force: |penalty gradient| / |denoising gradient| at the UNet output


@dataclass
class Calibration:
    tau: float
    mu: float
    sigma: float
    ref_norm: float      # mean guidance norm of calibration draws under tau
    num_values: int
    quantile: float
    frac_over: float

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.tau, self.mu, self.sigma, self.ref_norm, self.num_values, self.quantile,
                             self.frac_over], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "Calibration":
        v = [float(x) for x in t.double().cpu()]
        return cls(tau=v[0], mu=v[1], sigma=v[2], ref_norm=v[3], num_values=int(v[4]), quantile=v[5], frac_over=v[6])


class MemorizationPenalty:
    """See the module docstring. ``scorer``: an :class:`~memreg.score.AnisotropyScore`."""

    def __init__(self, scorer: AnisotropyScore, mode: str = "hinge", weight: float = 0.1,
                 tau: float | str = "auto", probes_per_step: int = 2, every_n_steps: int = 8,
                 warmup_steps: int = 0, term: str = "combined", zscore: str = "calib", tau_z: float = 1.645,
                 tau_quantile: float = 0.95, tau_ema: float = 0.0, calibration_prompts: int = 64,
                 calibration_seeds: int = 2, seed: int = 0, process_index: int = 0, grad_through: str = "both"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if term not in TERMS:
            raise ValueError(f"term must be one of {TERMS}, got {term!r}")
        if zscore not in ZSCORES:
            raise ValueError(f"zscore must be one of {ZSCORES}, got {zscore!r}")
        if grad_through not in GRAD_THROUGH:
            raise ValueError(f"grad_through must be one of {GRAD_THROUGH}, got {grad_through!r}")
        if not (tau == "auto" or isinstance(tau, (int, float))):
            raise ValueError(f"tau must be a number or 'auto', got {tau!r}")
        if probes_per_step < 1 or every_n_steps < 1 or warmup_steps < 0:
            raise ValueError("probes_per_step, every_n_steps >= 1 and warmup_steps >= 0 required")
        self.scorer = scorer
        self.mode, self.term, self.zscore = mode, term, zscore
        self.grad_through = grad_through
        self.weight = float(weight)
        self.tau_spec = tau
        self.tau: float | None = None if tau == "auto" else float(tau)
        self.tau_z = float(tau_z)
        self.tau_quantile = float(tau_quantile)
        self.tau_ema = float(tau_ema)
        self.probes_per_step = int(probes_per_step)
        self.every_n_steps = int(every_n_steps)
        self.warmup_steps = int(warmup_steps)
        self.calibration_prompts = int(calibration_prompts)
        self.calibration_seeds = int(calibration_seeds)
        self.seed = int(seed)
        # Probe stream: own CPU generator, different per process (so DDP ranks probe different noise).
        self.generator = torch.Generator("cpu").manual_seed(self.seed + 1_000_003 * int(process_index))
        self.calibration: Calibration | None = None
        self.calib_under: Tensor | None = None   # which calibration draws were under tau

    # ------------------------------------------------------------------ schedule
    def active(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based count of completed steps) carries probes."""
        return step >= self.warmup_steps and step % self.every_n_steps == 0

    @property
    def needs_calibration(self) -> bool:
        """Calibration also gives mu/sigma (zscore calib) and the reference norm, so it always runs."""
        return self.calibration is None

    # ------------------------------------------------------------------ UNet inputs
    def unet_inputs(self, latents: Tensor, cond: Tensor, uncond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.scorer.unet_inputs(latents, cond, uncond, self.terms)

    @property
    def terms(self) -> str:
        """The half of the scorer's batch the probes run (``memreg.score.TERM_SETS``)."""
        return {"combined": "both", "norm": "norm", "align": "align"}[self.term]

    @property
    def probe_samples(self) -> int:
        """UNet samples the probes add to an active step: (u, c) at one or both timesteps per probe."""
        return self.probes_per_step * (4 if self.term == "combined" else 2)

    def values_from_output(self, out: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        """(values, norm) per probe from the UNet output on :meth:`unet_inputs`; fp32, differentiable
        (through the conditional predictions only for ``grad_through="cond"``)."""
        if self.grad_through == "cond":
            out = self.scorer.detach_unconditional(out, self.terms)
        return self.values_norms(self.scorer.from_unet_output(out, latents, self.terms))

    def values_norms(self, so) -> tuple[Tensor, Tensor]:
        """Penalised value (score over the probed terms) and guidance norm (t_lo's for term align)."""
        return so.score, (so.norm_lo if self.term == "align" else so.norm)

    def draw_latents(self, n: int, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        return torch.randn((n, *shape), generator=generator or self.generator, dtype=torch.float32)

    def prepare(self, embeds: Tensor, uncond: Tensor, latent_shape: Sequence[int], step: int,
                latents_for: Callable[[Tensor], Tensor] | None = None) -> ProbeBatch | None:
        """Probe inputs for this step (None when inactive). Consumes only the penalty's generator.
        ``latents_for(index) -> (k, C, H, W)``: the probes' noise (default: fresh draws)."""
        if not self.active(step):
            return None
        b = embeds.shape[0]
        k = self.probes_per_step
        if k <= b:
            index = torch.randperm(b, generator=self.generator)[:k]
        else:
            index = torch.randint(b, (k,), generator=self.generator)
        latents = (self.draw_latents(k, latent_shape) if latents_for is None else latents_for(index)).to(embeds.device)
        cond = embeds[index.to(embeds.device)]
        sample, t, e = self.unet_inputs(latents, cond, uncond.to(device=embeds.device, dtype=embeds.dtype))
        return ProbeBatch(latents=latents, sample=sample, timesteps=t, embeds=e, index=index)

    # ------------------------------------------------------------------ loss
    def transform(self, values: Tensor, batch_values: Tensor | None = None) -> tuple[Tensor, float]:
        """(z(values), threshold in the same units) for the configured zscore."""
        if self.zscore == "none":
            return values, self._tau_value()
        if self.zscore == "calib":
            if self.calibration is None:
                raise RuntimeError("zscore='calib' needs calibrate() (or set_calibration) before training")
            mu, sigma = self.calibration.mu, max(self.calibration.sigma, 1e-12)
            return (values - mu) / sigma, (self._tau_value() - mu) / sigma
        ref = (batch_values if batch_values is not None else values).detach().float()
        mu = ref.mean()
        sigma = ref.std(unbiased=False).clamp_min(1e-12)
        return (values - mu) / sigma, self.tau_z

    def _tau_value(self) -> float:
        if self.tau is None:
            raise RuntimeError("tau='auto' is not calibrated yet; call calibrate() before training")
        return float(self.tau)

    def penalty(self, values: Tensor, batch_values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(scalar penalty, bool over-threshold mask) from per-probe values."""
        z, thr = self.transform(values, batch_values)
        over = (z > thr).detach()
        if self.mode == "hinge":
            loss = F.relu(z - thr).mean()
        else:
            loss = z.mean()
        return loss, over

    def relative_penalty(self, quantity: Tensor, threshold: float, known: Tensor) -> tuple[Tensor, Tensor]:
        """Reference modes: (scalar penalty, over mask) of ``quantity`` (growth over the base, or the
        value) against ``threshold``. Hinge ``mean(relu(q - thr) * known) / s``, ``s`` the calibration
        std for ``zscore: calib`` (unit-free weight), 1 for ``none``; probes without a base value
        (``known`` False) count as 0."""
        scale = 1.0
        if self.zscore == "calib":
            if self.calibration is None:
                raise RuntimeError("zscore='calib' needs calibrate() (or set_calibration) before training")
            scale = max(self.calibration.sigma, 1e-12)
        known = known.to(quantity.device)
        over = (quantity.detach() > threshold) & known   # on the values' device (NCCL gathers it)
        if self.mode == "hinge":
            per = F.relu(quantity - threshold) if math.isfinite(threshold) else torch.zeros_like(quantity)
        else:
            per = quantity
        return (torch.where(known, per, torch.zeros_like(per)) / scale).mean(), over

    def compute(self, out: Tensor, probe: ProbeBatch,
                gather: Callable[[Tensor], Tensor] | None = None) -> PenaltyOutput:
        """Penalty from the probe part of the fused UNet output."""
        values, norm = self.values_from_output(out, probe.latents)
        batch_values = None
        if self.zscore == "batch":
            batch_values = gather(values.detach()) if gather is not None else values.detach()
        loss, over = self.penalty(values, batch_values)
        return PenaltyOutput(loss=loss, weighted=self.weight * loss, values=values.detach(), norm=norm.detach(),
                             over=over)

    # ------------------------------------------------------------------ tau
    @torch.no_grad()
    def score_sample(self, prompts: Sequence[str | Sequence[str]], encode: Callable[[list[str]], Tensor],
                     uncond: Tensor, latent_shape: Sequence[int], run_unet: Callable | None = None,
                     batch_size: int = 16) -> tuple[Tensor, Tensor]:
        """(values, norms) of ``calibration_prompts`` captions x ``calibration_seeds`` single noise draws.

        The captions and the noise come from a generator seeded with ``seed`` alone (the same on
        every process and on every call, so a later call re-scores the very same draws); the
        training RNG is never used. ``encode(list[str]) -> (n, L, D)``; ``run_unet(sample, t,
        embeds)`` defaults to the scorer's UNet.
        """
        gen = torch.Generator("cpu").manual_seed(self.seed)
        n = min(self.calibration_prompts, len(prompts))
        if n == 0:
            raise ValueError("calibration needs at least one training caption")
        order = torch.randperm(len(prompts), generator=gen)[:n].tolist()
        chosen = []
        for i in order:
            p = prompts[i]
            if not isinstance(p, str):
                p = p[int(torch.randint(len(p), (1,), generator=gen))]
            chosen.append(p)
        # per draw, one (n, C, H, W) block of noise, whatever the chunking
        noise = [self.draw_latents(n, latent_shape, generator=gen) for _ in range(self.calibration_seeds)]
        so = score_prompts(self.scorer, encode, uncond, chosen, lambda c, lo, d: noise[d][lo:lo + len(c)],
                           draws=range(self.calibration_seeds), batch_size=batch_size, terms=self.terms,
                           run_unet=run_unet)
        values, norms = self.values_norms(so)
        return values.reshape(-1), norms.reshape(-1)

    @torch.no_grad()
    def calibrate(self, prompts: Sequence[str | Sequence[str]], encode: Callable[[list[str]], Tensor],
                  uncond: Tensor, latent_shape: Sequence[int], run_unet: Callable | None = None,
                  batch_size: int = 16) -> Calibration:
        """Score a seeded sample of training captions under the current (base) model.

        Sets tau to the ``tau_quantile`` quantile of the single-draw values when ``tau="auto"``;
        always records mu, sigma, and the reference guidance norm of the draws under tau.
        """
        values, norms = self.score_sample(prompts, encode, uncond, latent_shape, run_unet, batch_size)
        return self.calibrate_from_values(values, norms)

    def calibrate_from_values(self, values: Tensor, norms: Tensor) -> Calibration:
        values = values.detach().float().cpu()
        norms = norms.detach().float().cpu()
        tau = float(torch.quantile(values.double(), self.tau_quantile)) if self.tau_spec == "auto" else float(self.tau)
        under = values <= tau
        if not bool(under.any()):  # tau below every draw: the reference is all draws
            under = torch.ones_like(under)
        ref_norm = float(norms[under].mean())
        cal = Calibration(tau=tau, mu=float(values.mean()), sigma=float(values.std(unbiased=False)),
                          ref_norm=ref_norm, num_values=int(values.numel()), quantile=self.tau_quantile,
                          frac_over=float((values > tau).float().mean()))
        self.calib_under = under
        self.set_calibration(cal)
        return cal

    def conditioning_report(self, values: Tensor, norms: Tensor) -> dict[str, float]:
        """Compare a re-scoring of the calibration draws (``score_sample`` now) with calibration.

        ``final_cond_ratio``: mean guidance norm, now, of the draws that were under tau at
        calibration, over the same mean at calibration (1 = ordinary conditioning intact).
        """
        if self.calibration is None:
            raise RuntimeError("conditioning_report needs a calibration")
        values, norms = values.float().cpu(), norms.float().cpu()
        under = self.calib_under if self.calib_under is not None and self.calib_under.numel() == values.numel() \
            else values <= self._tau_value()
        final_under = float(norms[under].mean()) if bool(under.any()) else math.nan
        ref = self.calibration.ref_norm
        return {"tau": self._tau_value(), "ref_norm": ref, "final_norm_under": final_under,
                "final_cond_ratio": final_under / ref if ref > 0 else math.nan,
                "final_frac_over": float((values > self._tau_value()).float().mean()),
                "final_score_mean": float(values.mean())}

    def set_calibration(self, cal: Calibration) -> None:
        self.calibration = cal
        if self.tau is None or self.tau_spec == "auto":
            self.tau = cal.tau

    def update_tau(self, all_values: Tensor) -> None:
        """Running tau: EMA toward the q-quantile of this step's (gathered) probe values."""
        if self.tau_ema <= 0 or all_values.numel() == 0:
            return
        q = float(torch.quantile(all_values.detach().double().cpu(), self.tau_quantile))
        self.tau = (1 - self.tau_ema) * self._tau_value() + self.tau_ema * q

    def cond_ratio(self, values: Tensor, norms: Tensor, under: Tensor | None = None) -> float:
        """Mean guidance norm of probes at or under tau (or of the ``under`` mask: probes the
        penalty did not fire on) relative to calibration (nan if none)."""
        if self.calibration is None or self.calibration.ref_norm <= 0:
            return math.nan
        under = values <= self._tau_value() if under is None else under.bool()
        if not bool(under.any()):
            return math.nan
        return float(norms[under].mean()) / self.calibration.ref_norm

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "tau": self.tau,
            "calibration": None if self.calibration is None else self.calibration.as_tensor(),
            "calib_under": None if self.calib_under is None else self.calib_under.to(torch.uint8),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.tau = None if state.get("tau") is None else float(state["tau"])
        cal = state.get("calibration")
        self.calibration = None if cal is None else Calibration.from_tensor(cal)
        under = state.get("calib_under")
        self.calib_under = None if under is None else under.bool()


# ---------------------------------------------------------------------------- the guard


@dataclass
class PenaltyConfig:
    """Settings of ``guard.type: penalty`` (top-level ``guard.*`` keys)."""

    mode: str = "hinge"                   # hinge: mean(relu(s - tau)); mean: mean(s)
    weight: float = 0.0                   # lambda; 0 (default): the probes only feed the gate (README: measured)
    tau: Union[float, str] = "auto"       # float (raw score units) or "auto"
    tau_quantile: float = 0.95            # q of tau: auto (upper tail of ordinary captions)
    tau_ema: float = 0.0                  # > 0: tau <- (1-b) tau + b * q-quantile of each step's probes
    probes_per_step: int = 2              # k captions of the batch probed per active step
    every_n_steps: int = 2                # probes on optimizer steps with step % n == 0
    warmup_steps: int = 0                 # no penalty before this optimizer step
    term: str = "auto"                    # combined: g1*norm + g2*align; norm: g1*norm; align: g2*align (half the
                                          # probes); auto: combined with reference none, norm with the others
    zscore: str = "calib"                 # none | calib (divide by calibration std) | batch (z over the step's probes)
    max_force: Union[float, None] = None  # cap on a firing step's penalty gradient at the UNet output, as a
                                          # multiple of the denoising loss's (bound_force); None: no cap
    grad_through: str = "both"            # both: the score's gradient flows through eps(c) and eps(empty); cond:
                                          # eps(empty), shared by every caption, is detached (README: measured)
    tau_z: float = 1.645                  # hinge threshold in z units for zscore: batch
    preset: Union[str, None] = None       # sd1 | sd2 | None: sd2 for v-prediction models, else sd1
    t_hi: Union[int, None] = None
    t_lo: Union[int, None] = None
    calibration_prompts: int = 64
    calibration_seeds: int = 2
    fused_forward: bool = True            # probes ride in the denoising UNet forward
    probe_checkpointing: Union[bool, str] = "auto"  # activation checkpointing on probe steps; auto: when the
                                                    # run does not checkpoint anyway and the probes would add
                                                    # > PROBE_MEMORY_SHARE to the forward's samples
    # per-caption reference (memreg.guards.reference); none: the absolute tau above
    reference: str = "base+population"    # none | base | population | base+population
    reference_source: str = "auto"        # base values: cache | forward (LoRA adapters off / ctx.reference) | auto
    reference_draws: int = 2              # cache: fixed noise draws per caption
    reference_margin: float = 0.0         # base: threshold on the growth; base+population: its floor (value units)
    population_k: float = 2.0             # population threshold: median + k * 1.4826 * MAD of recent probes
    population_window: int = 256          # how many recent captions' latest values (all processes) it is taken over
    population_min: int = 16              # no penalty before this many values were seen
    # caption gate (memreg.guards.gate): captions a probe found over the threshold leave the denoising loss
    gate: bool = True
    gate_weight: float = 0.0              # a flagged caption's sample weight in the denoising loss
    gate_release: bool = False            # true: a probe back under the threshold unflags the caption


def resolve_term(term: str, reference: str) -> str:
    """``term: auto`` -> combined for the absolute penalty, norm for the reference modes (the norm's
    growth over the base separates duplicated captions best in the demo, AUC 0.98 vs align 0.74)."""
    if term != "auto":
        return term
    return "combined" if reference == "none" else "norm"


def bound_force(penalty: Tensor, probe_out: Tensor, mse: Tensor, model_pred: Tensor,
                max_force: float) -> tuple[Tensor, float]:
    """(``penalty`` scaled so that the norm of its gradient at the probes' UNet outputs is at most
    ``max_force`` times the norm of the denoising loss's gradient at the batch's predictions, the
    unscaled ratio). Both gradients stop at the UNet's output: no UNet backward. Why: a firing
    probe's gradient there measured 22-74x the denoising loss's at weights 0.03-0.1 (README), so a
    few firings dominated Adam's normalized updates, whatever the weight."""
    if not penalty.requires_grad or float(penalty.detach()) == 0.0:
        return penalty, 0.0
    g_pen = torch.autograd.grad(penalty, probe_out, retain_graph=True)[0].float().norm()
    g_mse = torch.autograd.grad(mse, model_pred, retain_graph=True)[0].float().norm()
    ratio = float(g_pen) / max(float(g_mse), 1e-12)
    return (penalty * (max_force / ratio) if ratio > max_force else penalty), ratio


PROBE_MEMORY_SHARE = 0.2   # probe samples / denoising samples above which "auto" checkpoints probe steps:
                           # activations grow with samples, so below it peak memory stays <= 1.2x plain


def auto_probe_checkpointing(probe_samples: int, batch_size: int, gradient_checkpointing: bool) -> bool:
    """Whether ``probe_checkpointing: auto`` recomputes activations on probe steps: only when the run
    does not checkpoint anyway and the probes would add more than ``PROBE_MEMORY_SHARE`` of the
    denoising batch's activations (checkpointing every step would cost a second forward each)."""
    return not gradient_checkpointing and probe_samples > PROBE_MEMORY_SHARE * batch_size


PROBE_FORWARDS = {"fused": "in the denoising UNet forward (one forward per backward)",
                  "separate": "in a separate UNet forward (guard.fused_forward=false)",
                  "measure": "in a separate no-grad forward (weight 0: measured, no training effect)"}


class PenaltyGuard(Guard):
    """The penalty behind the guard protocol.

    How the probes run (``probe_forward``): ``"fused"`` (concatenated onto the denoising batch: one
    forward, one backward; the only way under DDP), ``"separate"`` (a second forward; single process,
    ``guard.fused_forward: false``) or ``"measure"`` (weight 0: a no-grad forward of the unwrapped
    UNet, so the probes are logged but cannot change training and cost no backward).
    """

    name = "penalty"

    def __init__(self, ctx: GuardContext, penalty: MemorizationPenalty, fused: bool = True,
                 probe_checkpointing: Union[bool, str] = "auto", reference: Reference | None = None,
                 max_force: float | None = None, gate: CaptionGate | None = None):
        super().__init__(ctx)
        if max_force is not None and not max_force > 0:
            raise ValueError(f"guard.max_force must be > 0 (or null), got {max_force!r}")
        self.penalty = penalty
        self.max_force = max_force
        self.reference = reference        # None: the absolute tau (guard.reference: none)
        self.gate = gate                  # None: the denoising loss is the plain batch mean
        self.gate_counts = torch.zeros(4, dtype=torch.float64)   # gated/samples: duplicated, ordinary (whole run)
        self._gated: list[Tensor] = []    # this step's (gated, duplicated) per sample
        self._batch_captions: list[str] | None = None
        self.fire_counts = torch.zeros(4, dtype=torch.float64)   # over/probes: duplicated, ordinary (whole run)
        self.probe_forward = self._probe_forward(fused)
        pc = probe_checkpointing
        ckpt = (auto_probe_checkpointing(penalty.probe_samples, ctx.batch_size, ctx.gradient_checkpointing) if pc == "auto"
                else bool(pc) and not ctx.gradient_checkpointing)
        self.probe_checkpointing = ckpt and self.probe_forward != "measure"
        self._probe: ProbeBatch | None = None
        self._outs: list[PenaltyOutput] = []
        self.final_report: dict | None = None
        self._steps_logged = 0

    @classmethod
    def from_config(cls, cfg, ctx: GuardContext) -> "PenaltyGuard":
        scorer = make_scorer(ctx.unet, ctx.noise_scheduler, preset=cfg.preset, t_hi=cfg.t_hi, t_lo=cfg.t_lo,
                             prediction_type=ctx.prediction_type)
        pen = MemorizationPenalty(
            scorer, mode=cfg.mode, weight=cfg.weight, tau=cfg.tau, probes_per_step=cfg.probes_per_step,
            every_n_steps=cfg.every_n_steps, warmup_steps=cfg.warmup_steps, term=resolve_term(cfg.term, cfg.reference),
            zscore=cfg.zscore,
            tau_z=cfg.tau_z, tau_quantile=cfg.tau_quantile, tau_ema=cfg.tau_ema,
            calibration_prompts=cfg.calibration_prompts, calibration_seeds=cfg.calibration_seeds, seed=ctx.seed,
            process_index=ctx.process_index, grad_through=cfg.grad_through)
        return cls(ctx, pen, fused=cfg.fused_forward, probe_checkpointing=cfg.probe_checkpointing,
                   reference=build_reference(cfg, ctx), max_force=cfg.max_force,
                   gate=CaptionGate(cfg.gate_weight, cfg.gate_release) if cfg.gate else None)

    def _probe_forward(self, fused: bool) -> str:
        if self.penalty.weight == 0:
            return "measure"
        if fused:
            return "fused"
        if self.ctx.num_processes > 1:
            logger.warning("guard.fused_forward=false cannot work under DDP (one forward per backward); "
                           "falling back to the fused forward")
            return "fused"
        return "separate"

    @property
    def calibration(self) -> Calibration | None:
        return self.penalty.calibration

    def describe(self) -> str:
        p = self.penalty
        per = p.probe_samples
        ref = self.reference
        refs = "" if ref is None else f"; reference {ref.mode}" + ("" if ref.mode == "population"
                                                                  else f" (base values: {ref.source})")
        return (f"penalty: {per} probe samples per active step {PROBE_FORWARDS[self.probe_forward]}; every "
                f"{p.every_n_steps} steps from step {p.warmup_steps}; term {p.term}{refs}"
                + ("; activation checkpointing on probe steps" if self.probe_checkpointing else ""))

    def _score_calibration_draws(self):
        ctx = self.ctx
        with torch.no_grad():
            # chunks of batch_size captions (4x that many no-grad UNet samples): under the step's memory peak
            return self.penalty.score_sample(ctx.train_captions, ctx.encode, ctx.uncond(), ctx.latent_shape,
                                             run_unet=ctx.run_unet, batch_size=ctx.batch_size)

    def calibrate(self) -> None:
        cache = None if self.reference is None else self.reference.cache
        if cache is not None and not len(cache):   # not resumed: base values of every training caption
            self._build_cache(cache)
        if self.penalty.calibration is not None:   # resumed
            return
        cal = self.penalty.calibrate_from_values(*self._score_calibration_draws())
        if self.ctx.num_processes > 1:
            cal = Calibration.from_tensor(self.ctx.broadcast(cal.as_tensor()))
            self.penalty.set_calibration(cal)
        if self.ctx.is_main:
            logger.info("penalty calibration: tau=%.4f (q=%.2f of %d base-model scores; mu=%.4f sigma=%.4f), "
                        "reference guidance norm under tau=%.4f", cal.tau, cal.quantile, cal.num_values, cal.mu,
                        cal.sigma, cal.ref_norm)

    def _build_cache(self, cache) -> None:
        ctx, pen = self.ctx, self.penalty
        caps = distinct_captions(ctx.train_captions)
        if not caps:
            raise ValueError("guard.reference needs training captions for its base-value cache")

        def score(chunk: list[str]) -> Tensor:   # (draws, n) base values on the per-caption noise
            noise = lambda b, lo, d: caption_latents(b, [d] * len(b), cache.draws, cache.seed, ctx.latent_shape)
            so = score_prompts(pen.scorer, ctx.encode, ctx.uncond(), chunk, noise, draws=range(cache.draws),
                               batch_size=ctx.batch_size, terms=pen.terms, run_unet=ctx.run_unet)
            return pen.values_norms(so)[0]

        cache.build(caps, score, ctx.process_index, ctx.num_processes, ctx.gather,
                    device=getattr(ctx.unet, "device", None))
        if ctx.is_main:
            logger.info("penalty reference: base values of %d training captions x %d fixed noise draws cached",
                        len(cache), cache.draws)

    def captions(self, captions: list[str]) -> list[str]:
        """Remembers the batch's captions (reference cache lookup, per-caption noise, selectivity logs)."""
        self._batch_captions = list(captions)
        return captions

    def _prepare(self, step: int, embeds: Tensor) -> ProbeBatch | None:
        pen, ref, ctx = self.penalty, self.reference, self.ctx
        caps = self._batch_captions
        if caps is not None and len(caps) != embeds.shape[0]:
            caps = None
        cache = None if ref is None else ref.cache
        if (cache is not None or self.gate is not None) and caps is None:
            raise RuntimeError("guard.reference with a cache and guard.gate need the batch captions: call "
                               "guard.captions(captions) before guard.extra_inputs(...)")
        draw = None

        def cached_noise(index: Tensor) -> Tensor:
            nonlocal draw
            draw = torch.randint(cache.draws, (index.numel(),), generator=pen.generator)
            return caption_latents([caps[int(i)] for i in index], draw, cache.draws, cache.seed, ctx.latent_shape)

        probe = pen.prepare(embeds, ctx.uncond(), ctx.latent_shape, step, cached_noise if cache is not None else None)
        if probe is None:
            return None
        probe.captions = None if caps is None else [caps[int(i)] for i in probe.index]
        probe.keys = None if caps is None else caption_keys(probe.captions)
        if ref is not None:
            probe.base, probe.known = self._base_values(probe, draw)
        return probe

    def _base_values(self, probe: ProbeBatch, draw: Tensor | None) -> tuple[Tensor, Tensor]:
        """(k,) base values of the probes on their own noise, and which exist."""
        ref, k = self.reference, probe.index.numel()
        if ref.cache is not None:
            return ref.cache.lookup(probe.captions, draw)
        if ref.mode == "population":
            return torch.zeros(k), torch.ones(k, dtype=torch.bool)
        with torch.no_grad(), self.ctx.reference_unet() as unet:   # source forward: adapters off / frozen copy
            out = self.ctx.run_unet(probe.sample, probe.timesteps, probe.embeds, unet=unet)
        return self.penalty.values_from_output(out, probe.latents)[0].float().cpu(), torch.ones(k, dtype=torch.bool)

    def extra_inputs(self, step: int, embeds: Tensor) -> ExtraInputs | None:
        self._probe = probe = self._prepare(step, embeds)
        if probe is None or self.probe_forward != "fused":
            return None
        return ExtraInputs(probe.sample, probe.timesteps, probe.embeds, checkpointing=self.probe_checkpointing)

    def _probe_output(self, batch: GuardBatch, probe: ProbeBatch) -> Tensor:
        if self.probe_forward == "fused":
            return batch.extra_out
        if self.probe_forward == "separate":
            return batch.forward(probe.sample, probe.timesteps, probe.embeds, self.probe_checkpointing)
        with torch.no_grad():
            return self.ctx.run_unet(probe.sample, probe.timesteps, probe.embeds)

    def loss(self, batch: GuardBatch) -> GuardLoss:
        probe, self._probe = self._probe, None
        pout = probe_out = None
        if probe is not None:
            probe_out = self._probe_output(batch, probe)
            pout = self._evaluate(probe_out, probe)
            if self.gate is not None:   # this step's verdicts act on this very batch
                self.gate.update(pout.keys.cpu(), self.ctx.gather(pout.over.to(torch.uint8)).cpu())
        loss = self._denoising_loss(batch)
        res = GuardLoss(loss=loss, loss_mse=loss.detach())
        if pout is None:
            return res
        if self.max_force is not None:
            pout.weighted, pout.force = bound_force(pout.weighted, probe_out, loss, batch.model_pred, self.max_force)
        self._outs.append(pout)
        res.loss = loss + pout.weighted
        return res

    def _evaluate(self, probe_out: Tensor, probe: ProbeBatch) -> PenaltyOutput:
        """The penalty and its verdicts on the probes' UNet output (absolute tau or the reference)."""
        pen = self.penalty
        wanted = self.gate is not None or (self.reference is not None and self.reference.population is not None)
        keys = self.ctx.gather(probe.keys.to(probe_out.device)) if wanted and probe.keys is not None else None
        if self.reference is None:
            gather = self.ctx.gather if pen.zscore == "batch" else None
            pout = pen.compute(probe_out, probe, gather=gather)
            if pen.tau_ema > 0:
                pen.update_tau(self.ctx.gather(pout.values))
        else:
            pout = self._relative(probe_out, probe, keys)
        pout.keys = keys
        if probe.captions is not None:
            pout.duplicated = self.ctx.is_duplicated(probe.captions).to(pout.values.device)
        return pout

    def _denoising_loss(self, batch: GuardBatch) -> Tensor:
        """The batch mean, or with the gate the weighted mean that leaves flagged captions out."""
        if self.gate is None:
            return batch.per_sample.mean()
        caps = self._batch_captions
        if caps is None or len(caps) != batch.per_sample.shape[0]:
            raise RuntimeError("guard.gate needs the batch captions: call guard.captions(captions) before "
                               "guard.loss(...)")
        w = self.gate.weights(caption_keys(caps))
        self._gated.append(torch.stack([(w < 1).double(), self.ctx.is_duplicated(caps).double()]))
        return self.gate.weighted_mean(batch.per_sample, w)

    def _relative(self, out: Tensor, probe: ProbeBatch, keys: Tensor | None) -> PenaltyOutput:
        """Reference modes: the penalty on value - base against the reference's threshold (taken
        before this step's probes join the population, so every process uses the same one);
        ``keys``: the gathered caption keys of every process's probes (None: captions unknown)."""
        pen, ref = self.penalty, self.reference
        values, norm = pen.values_from_output(out, probe.latents)
        known = probe.known.to(values.device)
        quantity = values - probe.base.to(values.device, values.dtype)
        loss, over = pen.relative_penalty(quantity, ref.threshold(), known)
        growth = torch.where(known, quantity.detach(), torch.full_like(quantity, math.nan))
        if ref.population is not None:
            ref.population.update(self.ctx.gather(growth.float().contiguous()), keys)
        return PenaltyOutput(loss=loss, weighted=pen.weight * loss, values=values.detach(), norm=norm.detach(),
                             over=over, growth=growth)

    def step_logs(self, logs: dict[str, float]) -> dict[str, float]:
        pen, outs, self._outs = self.penalty, self._outs, []
        out = {"guard/tau": float(pen.tau) if pen.tau is not None else math.nan}
        out.update(self._gate_logs())
        if not outs:   # every process probes on the same steps, so the collectives below match
            return out
        g = self.ctx.gather
        vals = g(torch.cat([o.values for o in outs]).float())
        norms = g(torch.cat([o.norm for o in outs]).float())
        pens = g(torch.stack([o.loss.detach().float() for o in outs]))
        applied = g(torch.stack([o.weighted.detach().float() for o in outs]))
        over = g(torch.cat([o.over for o in outs]).float()).cpu()
        out.update({"guard/penalty": float(pens.mean()), "guard/weighted_penalty": float(applied.mean()),
                    "guard/probe_score_mean": float(vals.mean()), "guard/probe_score_p95": quantile(vals, 0.95),
                    "guard/frac_over_tau": float(over.mean())})
        out.update(self._selectivity_logs(outs, over))
        if self.max_force is not None:
            out["guard/force_ratio"] = float(g(torch.tensor([max(o.force for o in outs)], device=vals.device)).max())
        ratio = pen.cond_ratio(vals.cpu(), norms.cpu(), under=None if self.reference is None else over == 0)
        if not math.isnan(ratio):
            out[tags.GUARD_COND_RATIO] = ratio
        out["train/loss"] = logs["train/loss_mse"] + out["guard/weighted_penalty"]
        self._steps_logged += 1
        if self.ctx.is_main and (self._steps_logged <= 1 or self._steps_logged % 50 == 0):
            thr = out.get(tags.GUARD_THRESHOLD, out["guard/tau"])
            logger.info("probe step %d: threshold=%.4f probes over it %.0f%%, probe score mean %.4f, ordinary "
                        "conditioning ratio %.3f", self._steps_logged, thr,
                        100 * out["guard/frac_over_tau"], out["guard/probe_score_mean"], ratio)
        return out

    def _selectivity_logs(self, outs: list[PenaltyOutput], over: Tensor) -> dict[str, float]:
        """Firing rate per caption group (this step; totals kept for :meth:`finish`), and in the
        reference modes the threshold and the mean growth over the base."""
        g, out = self.ctx.gather, {}
        if self.reference is not None:
            out[tags.GUARD_THRESHOLD] = self.reference.threshold()
            growth = g(torch.cat([o.growth for o in outs]).float()).cpu()
            if bool(torch.isfinite(growth).any()):
                out[tags.GUARD_GROWTH_MEAN] = float(growth[torch.isfinite(growth)].mean())
        if any(o.duplicated is None for o in outs):   # the guard was not given the batch captions
            return out
        dup = g(torch.cat([o.duplicated for o in outs]).float()).cpu() > 0
        out.update({tags.guard_fire_rate(k): v for k, v in count_groups(self.fire_counts, over, dup).items()})
        return out

    def _gate_logs(self) -> dict[str, float]:
        """Share of this step's samples the gate left out, per caption group (totals kept for :meth:`finish`)."""
        if self.gate is None:
            return {}
        gated = torch.cat(self._gated, dim=1) if self._gated else torch.zeros(2, 0, dtype=torch.float64)
        self._gated = []
        g = self.ctx.gather
        drop, dup = g(gated[0].float()).cpu(), g(gated[1].float()).cpu() > 0
        out = {tags.GUARD_GATE_FLAGGED: float(len(self.gate.flagged))}
        out.update({tags.guard_gate_rate(k): v for k, v in count_groups(self.gate_counts, drop, dup).items()})
        return out

    def fire_rate_totals(self) -> dict[str, float]:
        """Firing rate per group over the whole run (nan: no probe of the group)."""
        counts = {"fire_rate": self.fire_counts, **({"gate_rate": self.gate_counts} if self.gate else {})}
        return {f"{prefix}_{k}": float(c[2 * i] / c[2 * i + 1]) if c[2 * i + 1] > 0 else math.nan
                for prefix, c in counts.items() for i, k in enumerate(tags.FIRE_GROUPS)}

    def finish(self) -> dict[str, float]:
        """Re-score the calibration draws (same captions and noise) with the trained model."""
        r = self.final_report = self.penalty.conditioning_report(*self._score_calibration_draws())
        r.update(self.fire_rate_totals())
        if self.ctx.is_main:
            logger.info("ordinary conditioning at the end: guidance norm of calibration draws that were under tau "
                        "at the start = %.4f (start %.4f, ratio %.3f); %.0f%% of draws now over tau=%.4f",
                        r["final_norm_under"], r["ref_norm"], r["final_cond_ratio"], 100 * r["final_frac_over"],
                        r["tau"])
        return r

    def state_dict(self) -> dict:
        return {**self.penalty.state_dict(), "fire_counts": self.fire_counts.clone(),
                "reference": None if self.reference is None else self.reference.state_dict(),
                "gate": None if self.gate is None else dict(self.gate.state_dict(), counts=self.gate_counts.clone())}

    def load_state_dict(self, state: dict) -> None:
        self.penalty.load_state_dict(state)
        if state.get("fire_counts") is not None:
            self.fire_counts = state["fire_counts"].double().cpu().clone()
        if self.reference is not None and state.get("reference") is not None:
            self.reference.load_state_dict(state["reference"])
        if self.gate is not None and state.get("gate") is not None:
            self.gate.load_state_dict(state["gate"])
            self.gate_counts = state["gate"]["counts"].double().cpu().clone()


def count_groups(counts: Tensor, hit: Tensor, duplicated: Tensor) -> dict[str, float]:
    """Add this step's hits and totals per group (duplicated, ordinary) to the run's ``counts``
    ``(4,)`` = hits/total of each, in place; returns the step's rate per group present."""
    hit, duplicated = hit.float().cpu(), duplicated.bool().cpu()
    for i, mask in enumerate((duplicated, ~duplicated)):
        counts[2 * i] += float(hit[mask].sum())
        counts[2 * i + 1] += float(mask.sum())
    return fire_rates(hit > 0, duplicated)


def build_reference(cfg, ctx: GuardContext) -> Reference | None:
    """The configured reference (None for ``reference: none``); ``source: auto`` -> ``cache`` (LoRA
    too: a per-step reference forward with the adapters off cost 1.38x step time at batch 4 in
    ``scripts/bench_train.py``), ``forward`` when the trainer hands over a frozen copy (``ctx.reference``)."""
    if cfg.reference not in REFERENCES:
        raise ValueError(f"guard.reference must be one of {REFERENCES}, got {cfg.reference!r}")
    if cfg.reference_source not in SOURCES:
        raise ValueError(f"guard.reference_source must be one of {SOURCES}, got {cfg.reference_source!r}")
    if cfg.reference == "none":
        return None
    source = cfg.reference_source
    if source == "auto":
        source = "forward" if ctx.reference is not None else "cache"
    return Reference(cfg.reference, source, draws=cfg.reference_draws, margin=cfg.reference_margin,
                     k=cfg.population_k, window=cfg.population_window, min_count=cfg.population_min, seed=ctx.seed)
