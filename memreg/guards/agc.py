"""``guard.type: agc``: the anti-gradient control mask of Liu et al., ECCV'24, "Iterative Ensemble
Training with Anti-Gradient Control for Mitigating Memorization in Diffusion Models" (the mask only,
not the ensemble sharding).

A running average of the per-sample loss per timestep, ``avg[t]`` (``num_train_timesteps`` entries,
starting at zero). A sample with loss ``l`` at timestep ``t`` is kept only if
``l * mem_ratio >= avg[t]``: a loss far below what that timestep usually costs marks an image the
model already reproduces. The loss is ``sum(kept l) / max(kept, 1)`` (the kept losses rescaled by
``batch / kept``; zero when nothing is kept). The mask uses ``avg`` **before** this batch updates it,
as the reference code does (liuxiao-guan/IET-AGC_SD, ``src/clients_acce_es.py``: the mask is taken
from ``avg_loss[timesteps]``, then each sample in batch order updates
``avg[t] = decay * avg[t] + (1 - decay) * l``). Defaults ``mem_ratio=1.25`` and ``decay=0.8`` are
the paper's ``--mem_ratio`` / ``--arr_ema_decay``. ``l`` is the loop's per-sample loss (SNR-weighted
when the run uses ``snr_gamma``). No extra forward.

Under DDP every process gathers the batch's (timestep, loss) pairs of all processes and applies
the updates in rank order, so the averages are identical everywhere; each process masks its own
samples. The averages are the guard's checkpoint state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memreg import log_tags as tags
from memreg.config_schema import ConfigError
from memreg.guards.base import Guard, GuardBatch, GuardContext, GuardLoss


@dataclass
class AGCConfig:
    """``guard.agc.*``."""

    mem_ratio: float = 1.25     # keep a sample if loss * mem_ratio >= avg[t]
    decay: float = 0.8          # avg[t] <- decay * avg[t] + (1 - decay) * loss

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.mem_ratio <= 0 or not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"guard.agc: mem_ratio must be > 0 and decay in [0, 1) (got {self.mem_ratio}, "
                              f"{self.decay})")


class AntiGradientControl(Guard):
    """See the module docstring."""

    name = "agc"

    def __init__(self, ctx: GuardContext, mem_ratio: float = 1.25, decay: float = 0.8):
        super().__init__(ctx)
        settings = AGCConfig(mem_ratio=mem_ratio, decay=decay)   # validates
        self.mem_ratio = float(settings.mem_ratio)
        self.decay = float(settings.decay)
        self.avg = torch.zeros(int(ctx.noise_scheduler.config.num_train_timesteps), dtype=torch.float64)
        self._kept: list[Tensor] = []

    @classmethod
    def from_config(cls, cfg, ctx: GuardContext) -> "AntiGradientControl":
        return cls(ctx, mem_ratio=cfg.agc.mem_ratio, decay=cfg.agc.decay)

    def describe(self) -> str:
        return f"agc: keep samples with loss x {self.mem_ratio} >= running mean of their timestep (decay {self.decay})"

    def mask(self, losses: Tensor, timesteps: Tensor) -> Tensor:
        """Which samples are kept, against the current averages."""
        ref = self.avg[timesteps.long().cpu()].to(losses.device)
        return losses.detach().double() * self.mem_ratio >= ref

    def update(self, losses: Tensor, timesteps: Tensor) -> None:
        """Per sample, in order: ``avg[t] = decay * avg[t] + (1 - decay) * loss``."""
        for t, v in zip(timesteps.long().cpu().tolist(), losses.detach().double().cpu().tolist()):
            self.avg[t] = self.decay * self.avg[t] + (1.0 - self.decay) * v

    def loss(self, batch: GuardBatch) -> GuardLoss:
        per = batch.per_sample
        keep = self.mask(per, batch.timesteps)
        kept = keep.to(per.dtype)
        loss = (per * kept).sum() / kept.sum().clamp_min(1.0)
        self._kept.append(keep.float())
        g = self.ctx.gather
        self.update(g(per.detach().float()), g(batch.timesteps.reshape(-1)))
        mse = per.detach().mean()
        return GuardLoss(loss=loss, loss_mse=mse)

    def step_logs(self, logs: dict[str, float]) -> dict[str, float]:
        kept, self._kept = self._kept, []
        if not kept:
            return {}
        return {tags.GUARD_AGC_KEPT_FRAC: float(self.ctx.gather(torch.cat(kept)).mean())}

    def state_dict(self) -> dict:
        return {"avg": self.avg.clone()}

    def load_state_dict(self, state: dict) -> None:
        avg = state["avg"].to(torch.float64)
        if avg.shape != self.avg.shape:
            raise ValueError(f"agc state holds {avg.numel()} timestep averages, the scheduler has {self.avg.numel()}")
        self.avg = avg.clone()
