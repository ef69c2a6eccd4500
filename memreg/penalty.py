"""The memorization penalty: the anisotropy score of a few batch captions, added to the MSE loss.

Each active optimizer step, :class:`MemorizationPenalty` takes ``k`` captions of the current batch,
draws pure-noise latents from its **own** ``torch.Generator`` (the training RNG stream is never
touched, so ``weight=0`` reproduces the plain run), and builds the scorer's UNet batch
``[u@t_hi, c@t_hi, u@t_lo, c@t_lo]`` (``term="norm"``: the ``t_hi`` half only; ``term="align"``: the
``t_lo`` half only, penalising ``g2 * align``, for models where the alignment term is the one that
rises with memorization). The training loop
concatenates it onto the denoising batch, runs ONE UNet forward, splits the output and hands the
probe part back to :meth:`MemorizationPenalty.compute`; gradients flow through the score.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from memreg.score import AnisotropyScore, channel_alignment, guidance_norm, to_epsilon, to_score_space

MODES = ("hinge", "mean")
TERMS = ("combined", "norm", "align")
ZSCORES = ("none", "calib", "batch")


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

    @property
    def size(self) -> int:
        return self.sample.shape[0]


@dataclass
class PenaltyOutput:
    loss: Tensor         # unweighted penalty, scalar with grad
    weighted: Tensor     # weight * loss
    values: Tensor       # (k,) penalised values (score or g1*norm), detached
    norm: Tensor         # (k,) guidance norms, detached
    over: Tensor         # (k,) bool: value above tau


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
                 calibration_seeds: int = 2, seed: int = 0, process_index: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if term not in TERMS:
            raise ValueError(f"term must be one of {TERMS}, got {term!r}")
        if zscore not in ZSCORES:
            raise ValueError(f"zscore must be one of {ZSCORES}, got {zscore!r}")
        if not (tau == "auto" or isinstance(tau, (int, float))):
            raise ValueError(f"tau must be a number or 'auto', got {tau!r}")
        if probes_per_step < 1 or every_n_steps < 1 or warmup_steps < 0:
            raise ValueError("probes_per_step, every_n_steps >= 1 and warmup_steps >= 0 required")
        self.scorer = scorer
        self.mode, self.term, self.zscore = mode, term, zscore
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
        sample, t, embeds = self.scorer.unet_inputs(latents, cond, uncond)
        half = sample.shape[0] // 2
        if self.term == "norm":
            return sample[:half], t[:half], embeds[:half]
        if self.term == "align":
            return sample[half:], t[half:], embeds[half:]
        return sample, t, embeds

    def values_from_output(self, out: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        """(values, norm) per probe from the UNet output on :meth:`unet_inputs`; fp32, differentiable."""
        if self.term == "combined":
            so = self.scorer.from_unet_output(out, latents)
            return so.score, so.norm
        sc = self.scorer
        o = out.float()
        x = latents.float()
        u, c = o.chunk(2)
        if self.term == "align":  # t_lo half; "norm" reported is the guidance norm at t_lo
            ab = sc._alpha_bar(sc.t_lo, x)
            eps_u = to_epsilon(u, x, ab, sc.prediction_type)
            guidance = to_epsilon(c, x, ab, sc.prediction_type) - eps_u
            return sc.g2 * channel_alignment(eps_u, guidance), guidance_norm(guidance)
        ab = sc._alpha_bar(sc.t_hi, x)
        conv = to_epsilon if sc.space == "eps" else to_score_space
        norm = guidance_norm(conv(c, x, ab, sc.prediction_type) - conv(u, x, ab, sc.prediction_type))
        return sc.g1 * norm, norm

    def draw_latents(self, n: int, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        return torch.randn((n, *shape), generator=generator or self.generator, dtype=torch.float32)

    def prepare(self, embeds: Tensor, uncond: Tensor, latent_shape: Sequence[int], step: int) -> ProbeBatch | None:
        """Probe inputs for this step (None when inactive). Consumes only the penalty's generator."""
        if not self.active(step):
            return None
        b = embeds.shape[0]
        k = self.probes_per_step
        if k <= b:
            index = torch.randperm(b, generator=self.generator)[:k]
        else:
            index = torch.randint(b, (k,), generator=self.generator)
        latents = self.draw_latents(k, latent_shape).to(embeds.device)
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
        run_unet = run_unet or self.scorer.run_unet
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
        values, norms = [], []
        for _ in range(self.calibration_seeds):
            for start in range(0, n, batch_size):
                chunk = chosen[start:start + batch_size]
                cond = encode(chunk)
                x = self.draw_latents(len(chunk), latent_shape, generator=gen).to(cond.device)
                sample, t, e = self.unet_inputs(x, cond, uncond.to(device=cond.device, dtype=cond.dtype))
                v, nm = self.values_from_output(run_unet(sample, t, e), x)
                values.append(v.float().cpu())
                norms.append(nm.float().cpu())
        return torch.cat(values), torch.cat(norms)

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

    def cond_ratio(self, values: Tensor, norms: Tensor) -> float:
        """Mean guidance norm of probes at or under tau relative to calibration (nan if none)."""
        if self.calibration is None or self.calibration.ref_norm <= 0:
            return math.nan
        under = values <= self._tau_value()
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
