"""``guard.type: wen_filter``: Wen et al., ICLR'24, "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models", training mitigation (their ``--hard_threshold``).

Per sample, with no grad, ``||eps(x_t, t, c) - eps(x_t, t, u)||_2`` on the sample's own noisy latent
and timestep (``c`` the caption, ``u`` the empty prompt; the conditional prediction is the training
forward's own output, the unconditional one a no-grad forward). Samples with a norm ``>= tau`` are
removed from the loss (MSE averaged over the kept ones); when every process removed every sample
the step is skipped; a process that removed all of its samples while others did not contributes
zero gradients. v-prediction outputs are converted to eps first. ``tau: auto`` = the
``tau_quantile`` quantile of base-model norms on a seeded sample of training batches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from memreg import log_tags as tags
from memreg.config_schema import ConfigError
from memreg.families import unconditional_for
from memreg.guards.base import Guard, GuardBatch, GuardContext, GuardLoss
from memreg.score import guidance_norm, to_epsilon

logger = logging.getLogger(__name__)


@dataclass
class WenFilterConfig:
    """``guard.wen.*``."""

    tau: Union[float, str] = "auto"       # float, or "auto": quantile of the base model's per-sample norms
    tau_quantile: float = 0.95
    calibration_batches: int = 8          # training batches scored for tau: auto

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if isinstance(self.tau, str) and self.tau != "auto":
            raise ConfigError(f"guard.wen.tau={self.tau!r} must be a number or 'auto'")
        if not 0.0 < self.tau_quantile < 1.0:
            raise ConfigError(f"guard.wen.tau_quantile={self.tau_quantile} must be in (0, 1)")


class WenFilter:
    """Per-sample drop rule. ``tau``: a number or ``"auto"`` (q-quantile of base-model norms)."""

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str, tau: float | str = "auto",
                 tau_quantile: float = 0.95):
        WenFilterConfig(tau=tau, tau_quantile=tau_quantile)   # validates
        self.alphas_cumprod = alphas_cumprod.detach().float().cpu()
        self.prediction_type = prediction_type
        self.tau_spec = tau
        self.tau: float | None = None if tau == "auto" else float(tau)
        self.tau_quantile = float(tau_quantile)

    @torch.no_grad()
    def norms(self, cond_pred: Tensor, uncond_pred: Tensor, noisy: Tensor, timesteps: Tensor) -> Tensor:
        """||eps_c - eps_u|| per sample (fp32, no grad)."""
        ab = self.alphas_cumprod[timesteps.long().cpu()].to(noisy.device)
        x = noisy.float()
        eps_c = to_epsilon(cond_pred.detach().float(), x, ab, self.prediction_type)
        eps_u = to_epsilon(uncond_pred.detach().float(), x, ab, self.prediction_type)
        return guidance_norm(eps_c - eps_u)

    def keep(self, norms: Tensor) -> Tensor:
        if self.tau is None:
            raise RuntimeError("WenFilter tau='auto' is not calibrated; call calibrate() first")
        return norms < self.tau

    @staticmethod
    def masked_loss(per_sample: Tensor, keep: Tensor) -> Tensor | None:
        """Mean loss over the kept samples; None when nothing is kept (skip the step)."""
        if not bool(keep.any()):
            return None
        k = keep.to(per_sample.dtype)
        return (per_sample * k).sum() / k.sum()

    def calibrate(self, norms: Tensor) -> float:
        """Set tau (if auto) to the q-quantile of base-model norms; returns tau."""
        if self.tau_spec == "auto":
            self.tau = float(torch.quantile(norms.detach().double().cpu(), self.tau_quantile))
        return float(self.tau)

    def state_dict(self) -> dict:
        return {"tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.tau = None if state.get("tau") is None else float(state["tau"])


class WenFilterGuard(Guard):
    """:class:`WenFilter` behind the guard protocol."""

    name = "wen_filter"

    def __init__(self, ctx: GuardContext, wen: WenFilter, calibration_batches: int = 8):
        super().__init__(ctx)
        self.wen = wen
        self.calibration_batches = int(calibration_batches)
        self.skipped_steps = 0
        self._kept: list[Tensor] = []
        self._all_skipped = True

    @classmethod
    def from_config(cls, cfg, ctx: GuardContext) -> "WenFilterGuard":
        w = cfg.wen
        wen = WenFilter(ctx.noise_scheduler.alphas_cumprod, ctx.prediction_type, tau=w.tau, tau_quantile=w.tau_quantile)
        return cls(ctx, wen, w.calibration_batches)

    def describe(self) -> str:
        return f"wen_filter: drop samples with guidance norm >= tau ({self.wen.tau_spec})"

    @torch.no_grad()
    def calibration_norms(self) -> Tensor:
        """Base-model ||eps_c - eps_u|| on a seeded sample of training batches (own generator)."""
        ctx = self.ctx
        if ctx.calibration_batches is None:
            raise RuntimeError("wen_filter tau: auto needs GuardContext.calibration_batches (or a numeric tau)")
        gen = torch.Generator("cpu").manual_seed(int(ctx.seed) + 31)
        uncond = ctx.uncond()
        norms = []
        for b in ctx.calibration_batches(self.calibration_batches, gen):
            noisy, t = b["noisy"], b["timesteps"]
            cond = ctx.encode(b["captions"])
            c = ctx.run_unet(noisy, t, cond)
            u = ctx.run_unet(noisy, t, unconditional_for(uncond, cond))
            norms.append(self.wen.norms(c, u, noisy, t).cpu())
        return torch.cat(norms)

    def calibrate(self) -> None:
        if self.wen.tau is not None:
            return
        norms = self.calibration_norms()
        tau = self.wen.calibrate(norms)
        if self.ctx.num_processes > 1:
            self.wen.tau = float(self.ctx.broadcast(torch.tensor([tau], dtype=torch.float64))[0])
        if self.ctx.is_main:
            logger.info("wen_filter calibration: tau=%.4f (q=%.2f of %d base-model norms)", self.wen.tau,
                        self.wen.tau_quantile, norms.numel())

    def loss(self, batch: GuardBatch) -> GuardLoss:
        ctx = self.ctx
        uncond = unconditional_for(ctx.uncond(), batch.embeds)   # SDXL: the rows' own size/crop time ids
        with torch.no_grad():
            u_pred = ctx.run_unet(batch.noisy, batch.timesteps, uncond)
        keep = self.wen.keep(self.wen.norms(batch.model_pred, u_pred, batch.noisy, batch.timesteps))
        self._kept.append(keep.float())
        kept_total = ctx.reduce_sum(keep.sum().to(torch.float32).reshape(1))
        nan = torch.tensor(math.nan)
        if float(kept_total) == 0:           # every process dropped everything: skip the step everywhere
            return GuardLoss(loss=None, loss_mse=nan)
        self._all_skipped = False
        zero = (batch.model_pred.float() * 0).sum()   # keeps every parameter in the graph (DDP)
        mse = self.wen.masked_loss(batch.per_sample, keep)
        if mse is None:                      # this process dropped all, others did not: zero gradients
            return GuardLoss(loss=zero, loss_mse=nan)
        return GuardLoss(loss=mse + zero, loss_mse=mse.detach())

    def step_logs(self, logs: dict[str, float]) -> dict[str, float]:
        self.skipped_steps += int(self._all_skipped)
        kept, self._kept, self._all_skipped = self._kept, [], True
        out = {tags.GUARD_WEN_TAU: self.wen.tau, tags.GUARD_WEN_SKIPPED_STEPS: self.skipped_steps}
        if kept:
            out[tags.GUARD_WEN_KEPT_FRAC] = float(self.ctx.gather(torch.cat(kept)).mean())
        return out

    def state_dict(self) -> dict:
        return dict(self.wen.state_dict(), skipped_steps=self.skipped_steps)

    def load_state_dict(self, state: dict) -> None:
        self.wen.load_state_dict(state)
        self.skipped_steps = int(state.get("skipped_steps", 0))
