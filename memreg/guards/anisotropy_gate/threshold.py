"""The verdict: which probes are over the threshold, behind one interface for every mode.

``guard.reference: none`` is :class:`AbsoluteThreshold`: a probe's value against a tau fixed on the
base model (:class:`Calibrator`); the reference modes are
:class:`~memreg.guards.anisotropy_gate.reference.Reference`: a caption's growth over its base-model
value and/or a running population threshold. Both implement :class:`Threshold`, so the guard calls
the same hooks whatever the mode: ``calibrate`` (before training), ``attach`` (base values of a
probe batch), ``compare`` (values -> :class:`~memreg.guards.anisotropy_gate.loss.Verdict`),
``update`` (after the verdict: tau EMA or the population), ``logs``, ``under`` (the probes the
conditioning ratio is taken over) and ``state_dict``.

The :class:`Calibrator` serves every mode: ``tau="auto"`` is set once before training as the
``tau_quantile`` quantile (default 0.95, the upper tail) of single-draw values of a sample of
training captions under the base model, so ordinary captions sit below it; its mean and std are
the units of ``zscore: calib``; the mean guidance norm of the draws under tau is the reference of
``cond_ratio``, the scalar that shows ordinary conditioning survives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from memreg.guards.anisotropy_gate.loss import Verdict, zscored
from memreg.guards.anisotropy_gate.probes import FixedNoise, ProbeBatch, ProbeResult, ProbeSampler


def _identity(t: Tensor) -> Tensor:
    return t


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


class Calibrator:
    """tau and the calibration statistics (see the module docstring). ``tau_ema`` > 0 lets tau track
    the ``tau_quantile`` quantile of the probes as training moves."""

    def __init__(self, tau: float | str = "auto", tau_quantile: float = 0.95, tau_ema: float = 0.0):
        self.tau_spec = tau
        self.tau: float | None = None if tau == "auto" else float(tau)
        self.tau_quantile = float(tau_quantile)
        self.tau_ema = float(tau_ema)
        self.calibration: Calibration | None = None
        self.calib_under: Tensor | None = None   # which calibration draws were under tau

    @classmethod
    def from_config(cls, cfg) -> "Calibrator":
        return cls(tau=cfg.tau, tau_quantile=cfg.tau_quantile, tau_ema=cfg.tau_ema)

    def tau_value(self) -> float:
        if self.tau is None:
            raise RuntimeError("tau='auto' is not calibrated yet; call calibrate() before training")
        return float(self.tau)

    def calibrate_from_values(self, values: Tensor, norms: Tensor) -> Calibration:
        """Calibration from single-draw base-model ``values`` and guidance ``norms`` (a sample's)."""
        values = values.detach().float().cpu()
        norms = norms.detach().float().cpu()
        tau = float(torch.quantile(values.double(), self.tau_quantile)) if self.tau_spec == "auto" else float(self.tau)
        under = values <= tau
        if not bool(under.any()):  # tau below every draw: the reference is all draws
            under = torch.ones_like(under)
        cal = Calibration(tau=tau, mu=float(values.mean()), sigma=float(values.std(unbiased=False)),
                          ref_norm=float(norms[under].mean()), num_values=int(values.numel()),
                          quantile=self.tau_quantile, frac_over=float((values > tau).float().mean()))
        self.calib_under = under
        self.set_calibration(cal)
        return cal

    def set_calibration(self, cal: Calibration) -> None:
        self.calibration = cal
        if self.tau is None or self.tau_spec == "auto":
            self.tau = cal.tau

    def update_tau(self, all_values: Tensor) -> None:
        """Running tau: EMA toward the q-quantile of this step's (gathered) probe values."""
        if self.tau_ema <= 0 or all_values.numel() == 0:
            return
        q = float(torch.quantile(all_values.detach().double().cpu(), self.tau_quantile))
        self.tau = (1 - self.tau_ema) * self.tau_value() + self.tau_ema * q

    def cond_ratio(self, values: Tensor, norms: Tensor, under: Tensor | None = None) -> float:
        """Mean guidance norm of probes at or under tau (or of the ``under`` mask: probes the
        threshold did not fire on) relative to calibration (nan if none)."""
        if self.calibration is None or self.calibration.ref_norm <= 0:
            return math.nan
        under = values <= self.tau_value() if under is None else under.bool()
        if not bool(under.any()):
            return math.nan
        return float(norms[under].mean()) / self.calibration.ref_norm

    def conditioning_report(self, values: Tensor, norms: Tensor) -> dict[str, float]:
        """Compare a re-scoring of the calibration draws (now) with calibration.

        ``final_cond_ratio``: mean guidance norm, now, of the draws that were under tau at
        calibration, over the same mean at calibration (1 = ordinary conditioning intact).
        """
        if self.calibration is None:
            raise RuntimeError("conditioning_report needs a calibration")
        values, norms = values.float().cpu(), norms.float().cpu()
        under = self.calib_under if self.calib_under is not None and self.calib_under.numel() == values.numel() \
            else values <= self.tau_value()
        final_under = float(norms[under].mean()) if bool(under.any()) else math.nan
        ref = self.calibration.ref_norm
        return {"tau": self.tau_value(), "ref_norm": ref, "final_norm_under": final_under,
                "final_cond_ratio": final_under / ref if ref > 0 else math.nan,
                "final_frac_over": float((values > self.tau_value()).float().mean()),
                "final_score_mean": float(values.mean())}

    def state_dict(self) -> dict:
        return {"tau": self.tau,
                "calibration": None if self.calibration is None else self.calibration.as_tensor(),
                "calib_under": None if self.calib_under is None else self.calib_under.to(torch.uint8)}

    def load_state_dict(self, state: dict) -> None:
        self.tau = None if state.get("tau") is None else float(state["tau"])
        cal = state.get("calibration")
        self.calibration = None if cal is None else Calibration.from_tensor(cal)
        under = state.get("calib_under")
        self.calib_under = None if under is None else under.bool()


class Threshold(Protocol):
    """What the guard asks of a mode's verdict (see the module docstring)."""

    mode: str                             # the guard.reference value
    fixed_noise: FixedNoise | None        # per-caption noise the probes must draw (a base-value cache), or None
    wants_keys: bool                      # update() uses the gathered caption keys

    def calibrate(self, ctx: Any, probes: ProbeSampler) -> None: ...
    def attach(self, probe: ProbeBatch, ctx: Any, probes: ProbeSampler) -> None: ...
    def compare(self, values: Tensor, probe: ProbeBatch) -> Verdict: ...
    def update(self, verdict: Verdict, keys: Tensor | None) -> None: ...
    def logs(self, results: Sequence[ProbeResult]) -> dict[str, float]: ...
    def under(self, over: Tensor) -> Tensor | None: ...
    def describe(self) -> str: ...
    def state_dict(self) -> dict | None: ...
    def load_state_dict(self, state: dict) -> None: ...


class AbsoluteThreshold:
    """``guard.reference: none``: a probe is over when ``z(value) > z(tau)`` (``zscore`` units)."""

    mode = "none"
    fixed_noise = None
    wants_keys = False

    def __init__(self, calibrator: Calibrator, zscore: str = "calib", tau_z: float = 1.645,
                 gather: Callable[[Tensor], Tensor] = _identity):
        self.calibrator, self.zscore, self.tau_z, self.gather = calibrator, zscore, float(tau_z), gather

    @classmethod
    def from_config(cls, cfg, calibrator: Calibrator, gather: Callable[[Tensor], Tensor] = _identity):
        return cls(calibrator, zscore=cfg.zscore, tau_z=cfg.tau_z, gather=gather)

    def calibrate(self, ctx, probes: ProbeSampler) -> None:
        """Nothing beyond the shared calibration."""

    def attach(self, probe: ProbeBatch, ctx, probes: ProbeSampler) -> None:
        """No base values."""

    def compare(self, values: Tensor, probe: ProbeBatch | None = None) -> Verdict:
        batch = self.gather(values.detach()) if self.zscore == "batch" else None
        cal = self.calibrator
        z, bar = zscored(values, self.zscore, cal.calibration, cal.tau_value, self.tau_z, batch)
        return Verdict(quantity=z, bar=bar, over=(z > bar).detach(), values=values.detach())

    def update(self, verdict: Verdict, keys: Tensor | None = None) -> None:
        if self.calibrator.tau_ema > 0:
            self.calibrator.update_tau(self.gather(verdict.values))

    def logs(self, results: Sequence[ProbeResult]) -> dict[str, float]:
        return {}

    def under(self, over: Tensor) -> Tensor | None:
        """None: the conditioning ratio is taken over the probes at or under tau."""
        return None

    def describe(self) -> str:
        return ""

    def state_dict(self) -> dict | None:
        return None   # tau lives in the calibrator's state

    def load_state_dict(self, state: dict) -> None:
        pass
