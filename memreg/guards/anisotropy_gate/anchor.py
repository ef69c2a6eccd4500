"""``guard.penalty: anchor``: the rows the gate flagged are pulled toward the base model.

A flagged row (a training image a probe found memorized, :mod:`.gate`) leaves the denoising loss;
with ``weight`` λ > 0 it comes back with the base model's prediction as its target instead of the
noise: its term is ``a_i = mean((eps_theta(x_t, t, c_i) - eps_base(x_t, t, c_i))^2)`` on the very
noisy latents, timesteps and conditioning the batch trained on, and the loss is

    L = (sum_i w_i d_i + λ sum_{i flagged} a_i) / (sum_i w_i + λ n_flagged)

with ``d_i`` the denoising loss and ``w_i`` the gate's weights (``gate_weight`` for flagged rows).

Why this shape:

* its optimum is a model the run started from: the base's predictions on the flagged image, which
  the base made without having memorized it, so no weight can push a caption past its base-model
  self (the score's hinge could: it drove the held-out guidance norm to 0.05x of the plain run's);
* it never optimizes the probes' score, so the score stays an honest reading of the model (a
  caption's value falls only as its predictions return to the base's);
* λ ≤ 1 keeps every row's share of the loss at most an ordinary row's: at λ = 1 a flagged row
  counts as much as any other row, only its target is the base's, so the denoising data keep at
  least their share of each step. Larger weights are refused (:func:`~memreg.guards.anisotropy_gate.config.check_penalty`).

The base predictions are one no-grad forward of the flagged rows through ``ctx.reference_unet()``
(LoRA: the adapters disabled; full fine-tuning: the frozen copy the trainer keeps when this
penalty is on).
"""

from __future__ import annotations

import torch
from torch import Tensor


def anchor_per_sample(model_pred: Tensor, base_pred: Tensor) -> Tensor:
    """(n,) mean squared distance of each row's prediction from the base model's (float32)."""
    d = model_pred.float() - base_pred.float()
    return d.pow(2).mean(dim=tuple(range(1, d.ndim)))


def anchored_mean(per_sample: Tensor, weights: Tensor, anchor: Tensor, rows: Tensor, anchor_weight: float) -> Tensor:
    """``(sum w_i d_i + λ sum_rows a_i) / (sum w_i + λ len(rows))`` (module docstring); ``anchor``
    holds the terms of ``rows`` (indices into the batch) in order. When nothing carries weight, a
    zero that keeps the graph (every DDP process must backward)."""
    w = weights.to(per_sample.device, per_sample.dtype)
    total = w.sum() + anchor_weight * rows.numel()
    num = (per_sample * w).sum() + anchor_weight * anchor.to(per_sample.dtype).sum()
    if float(total) == 0.0:
        return (per_sample * 0).sum()
    return num / total


def base_predictions(ctx, noisy: Tensor, timesteps: Tensor, embeds, rows: Tensor) -> Tensor:
    """The base model's no-grad predictions for batch ``rows`` (``ctx``: the guard's context)."""
    with torch.no_grad(), ctx.reference_unet() as ref:
        return ctx.run_unet(noisy[rows], timesteps[rows], embeds[rows], unet=ref)
