"""The penalty on the probes' verdicts, z-scoring, and the force bound.

Per probe the threshold (:mod:`~memreg.guards.anisotropy_gate.threshold`) hands over a quantity and
the bar it is held against; the penalty is ``mode="hinge"``: ``mean(relu(q - bar))``, ``mode="mean"``:
``mean(q)``. Probes without a base value (``known`` False) count as 0. ``zscore`` makes ``weight``
unit-free across models: ``"calib"`` measures in calibration standard deviations, ``"batch"`` z-scores
over the step's probes (gathered across processes; the bar is then ``tau_z``), ``"none"`` keeps raw units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Verdict:
    """What a threshold says of one step's probes: the penalised quantity and its bar (same units)."""

    quantity: Tensor                 # (k,) with grad: z(value) (absolute) or value - base (reference)
    bar: float                       # the threshold in the quantity's units
    over: Tensor                     # (k,) bool, detached: quantity above the bar (and known)
    values: Tensor                   # (k,) the probe values, detached
    known: Tensor | None = None      # (k,) bool: the probe has a base value (None: all)
    scale: float = 1.0               # divides the penalty (zscore calib in the reference modes)
    growth: Tensor | None = None     # reference modes: (k,) value - base, detached (nan: no base)


def calib_sigma(calibration) -> float:
    """The calibration's standard deviation (floored), the unit of ``zscore: calib``."""
    if calibration is None:
        raise RuntimeError("zscore='calib' needs calibrate() (or set_calibration) before training")
    return max(calibration.sigma, 1e-12)


def calib_scale(zscore: str, calibration) -> float:
    """Reference modes: the penalty's divisor, the calibration std for ``zscore: calib``, else 1
    (a difference of values needs no mean subtracted)."""
    return calib_sigma(calibration) if zscore == "calib" else 1.0


def zscored(values: Tensor, zscore: str, calibration, tau: Callable[[], float], tau_z: float,
            batch_values: Tensor | None = None) -> tuple[Tensor, float]:
    """Absolute mode: (z(values), z(tau)) for the configured zscore; ``tau()`` is read only when used."""
    if zscore == "none":
        return values, tau()
    if zscore == "calib":
        sigma = calib_sigma(calibration)
        mu = calibration.mu
        return (values - mu) / sigma, (tau() - mu) / sigma
    ref = (batch_values if batch_values is not None else values).detach().float()
    mu = ref.mean()
    sigma = ref.std(unbiased=False).clamp_min(1e-12)
    return (values - mu) / sigma, tau_z


def penalty(mode: str, verdict: Verdict) -> Tensor:
    """The unweighted penalty (scalar, with grad) of a verdict; an infinite bar (a population not yet
    warmed up) gives 0."""
    q = verdict.quantity
    if mode == "hinge":
        per = F.relu(q - verdict.bar) if math.isfinite(verdict.bar) else torch.zeros_like(q)
    else:
        per = q
    if verdict.known is None:
        return per.mean()
    known = verdict.known.to(q.device)
    return (torch.where(known, per, torch.zeros_like(per)) / verdict.scale).mean()


def bound_force(penalty: Tensor, probe_out: Tensor, mse: Tensor, model_pred: Tensor,
                max_force: float) -> tuple[Tensor, float]:
    """(``penalty`` scaled so that the norm of its gradient at the probes' UNet outputs is at most
    ``max_force`` times the norm of the denoising loss's gradient at the batch's predictions, the
    unscaled ratio). Both gradients stop at the UNet's output: no UNet backward. Why: a firing
    probe's gradient there can be tens of times the denoising loss's (README), so a few firings
    would dominate Adam's normalized updates, whatever the weight."""
    if not penalty.requires_grad or float(penalty.detach()) == 0.0:
        return penalty, 0.0
    g_pen = torch.autograd.grad(penalty, probe_out, retain_graph=True)[0].float().norm()
    g_mse = torch.autograd.grad(mse, model_pred, retain_graph=True)[0].float().norm()
    ratio = float(g_pen) / max(float(g_mse), 1e-12)
    return (penalty * (max_force / ratio) if ratio > max_force else penalty), ratio
