"""Finite or stop: the trainer's check that no NaN or infinity is trained on or written out.

Every optimizer step the loop checks the step's losses and the gradient norm it already computes for
clipping, before ``optimizer.step()``; a non-finite value stops the run with :class:`NonFiniteError`
(exit code 2), so the weights stay those of the last finite step, no checkpoint is written over the
last good one and no final weights are written. Under DDP the verdict is summed over processes, so
every process stops at the same step instead of leaving the others waiting in a collective.

fp16 mixed precision is the one case where a non-finite *gradient* is expected: accelerate's loss
scaler overflows on purpose, skips that optimizer step and lowers the scale, so there only the loss is
checked. There is no option to skip non-finite steps otherwise: in fp32/bf16 a non-finite loss means the
weights or the data are already broken, and skipping would keep training from the weights that
produced it. Weights are checked once more before a checkpoint or the final outputs are written
(:func:`first_nonfinite_param`).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from memreg.errors import MemregError


class NonFiniteError(MemregError):
    """Training produced a NaN or infinity; the message names the step, the value and the likely cause."""


def nonfinite_losses(losses: Iterable[torch.Tensor | None]) -> int:
    """How many of a step's micro-batch losses are NaN or infinite (``None``: a skipped micro-batch)."""
    vals = [loss.detach().float().reshape(()) for loss in losses if loss is not None]
    if not vals:
        return 0
    return int((~torch.isfinite(torch.stack(vals))).sum())


def first_nonfinite_param(named_params: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first parameter holding a NaN or infinity, else None."""
    for name, p in named_params:
        if not bool(torch.isfinite(p.detach()).all()):
            return name
    return None


def likely_cause(step: int, cfg) -> str:
    """What usually makes a step non-finite, from the step number and the run's settings."""
    if step <= 1:
        return ("the base model or the first batch already gives a non-finite loss: check the model's weights "
                "and the images" + (", or train without fp16 (mixed_precision bf16 or no)"
                                    if cfg.mixed_precision == "fp16" else ""))
    return (f"the weights diverged: learning_rate={cfg.learning_rate:g} is likely too high for this model "
            f"(max_grad_norm={cfg.max_grad_norm})")


def step_error(step: int, cfg, bad_losses: int, grad_norm: float | None, last_checkpoint: str | None) -> NonFiniteError:
    """The one-line error for optimizer step ``step`` (1-based)."""
    what = []
    if bad_losses:
        what.append(f"{bad_losses} non-finite loss value(s)")
    if grad_norm is not None and not math.isfinite(grad_norm):
        what.append(f"gradient norm {grad_norm}")
    kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
            else "no checkpoint was written before it")
    return NonFiniteError(f"step {step}: {' and '.join(what)}; training stopped before the optimizer step and no "
                          f"final weights were written ({kept}). Likely cause: {likely_cause(step, cfg)}")
