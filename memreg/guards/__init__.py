"""Memorization guards behind one protocol (public API).

Exports:

* :class:`Guard` - the protocol/base class (``calibrate``, ``captions``, ``embeds``, ``extra_inputs``,
  ``loss``, ``step_logs``, ``finish``, ``state_dict``/``load_state_dict``); :class:`NoGuard`.
* :class:`GuardContext` - what a guard may use of the run (UNet, scheduler, encoders, collectives).
* :class:`ExtraInputs`, :class:`GuardBatch`, :class:`GuardLoss` - what passes between loop and guard;
  :func:`concat_inputs` / :func:`split_output` fuse the guard's extra UNet inputs into the forward.
* :func:`build_guard` (``guard.type`` -> guard), :func:`guard_config`, ``GUARDS`` (the registry).

Guards: ``none``, ``anisotropy_gate`` (alias ``penalty``; the package :mod:`memreg.guards.anisotropy_gate`:
probes, threshold, per-caption reference, caption gate, penalty, selectivity counters), ``wen_filter``
(:mod:`memreg.guards.wen_filter`), ``caption_noise`` (:mod:`memreg.guards.caption_noise`) and ``agc``
(:mod:`memreg.guards.agc`). README "Add the guard to your own training loop" shows the lines a
training script needs.
"""

from memreg.guards.base import (ExtraInputs, Guard, GuardBatch, GuardContext, GuardLoss, NoGuard, concat_inputs,
                                split_output)
from memreg.guards.registry import GUARDS, GuardConfig, GuardSpec, build_guard, guard_class, guard_config, guard_spec

__all__ = ["GUARDS", "ExtraInputs", "Guard", "GuardBatch", "GuardConfig", "GuardContext", "GuardLoss", "GuardSpec",
           "NoGuard", "build_guard", "concat_inputs", "guard_class", "guard_config", "guard_spec", "split_output"]
