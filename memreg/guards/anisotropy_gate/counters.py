"""Selectivity: how often the probes fire and the gate acts on duplicated vs ordinary captions.

A guard that fires as often on ordinary captions as on duplicated ones only adds noise, so every
mode logs, per step and over the run, the firing rate of each caption group
(``guard/fire_rate/<group>``) and, with the gate, the share of training samples it left out
(``guard/gate_rate/<group>``). Groups come from ``GuardContext.duplicated_captions``. Counts are
kept as ``(4,)`` float64 tensors ``[hits, total]`` of duplicated then ordinary, so they gather and
checkpoint as they are.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from memreg import log_tags as tags
from memreg.guards.anisotropy_gate.probes import ProbeResult
from memreg.guards.base import quantile


def probe_logs(results: Sequence[ProbeResult], values: Tensor, over: Tensor,
               gather: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """The step's penalty and probe values (``values``/``over``: every process's, gathered)."""
    pens = gather(torch.stack([r.loss.detach().float() for r in results]))
    applied = gather(torch.stack([r.weighted.detach().float() for r in results]))
    return {tags.GUARD_PENALTY: float(pens.mean()), tags.GUARD_WEIGHTED_PENALTY: float(applied.mean()),
            tags.GUARD_PROBE_SCORE_MEAN: float(values.mean()), tags.GUARD_PROBE_SCORE_P95: quantile(values, 0.95),
            tags.GUARD_FRAC_OVER_TAU: float(over.mean())}


def fire_rates(over: Tensor, duplicated: Tensor) -> dict[str, float]:
    """Fraction of probes over the threshold among duplicated and among ordinary captions
    (a group without probes is left out)."""
    over, duplicated = over.bool().cpu(), duplicated.bool().cpu()
    out = {}
    for group, mask in (("duplicated", duplicated), ("ordinary", ~duplicated)):
        if bool(mask.any()):
            out[group] = float(over[mask].float().mean())
    return out


def count_groups(counts: Tensor, hit: Tensor, duplicated: Tensor) -> dict[str, float]:
    """Add this step's hits and totals per group (duplicated, ordinary) to the run's ``counts``
    ``(4,)`` = hits/total of each, in place; returns the step's rate per group present."""
    hit, duplicated = hit.float().cpu(), duplicated.bool().cpu()
    for i, mask in enumerate((duplicated, ~duplicated)):
        counts[2 * i] += float(hit[mask].sum())
        counts[2 * i + 1] += float(mask.sum())
    return fire_rates(hit > 0, duplicated)


class SelectivityCounters:
    """Run totals of probe firings (``fire_counts``) and, with a gate, of gated samples
    (``gate_counts``); the step logs of both. ``gather``: concatenate a 1-D tensor over processes."""

    def __init__(self, gather: Callable[[Tensor], Tensor], gate: bool):
        self.gather = gather
        self.fire_counts = torch.zeros(4, dtype=torch.float64)   # over/probes: duplicated, ordinary
        self.gate_counts = torch.zeros(4, dtype=torch.float64) if gate else None   # gated/samples
        self._gated: list[Tensor] = []    # this step's (gated, duplicated) per sample

    def record_gated(self, weights: Tensor, duplicated: Tensor) -> None:
        """One batch's gate weights (< 1: left out) and which of its samples are duplicated."""
        self._gated.append(torch.stack([(weights < 1).double(), duplicated.double()]))

    def fire_logs(self, over: Tensor, duplicated: Tensor | None) -> dict[str, float]:
        """This step's firing rate per group (``over``/``duplicated`` gathered); none when the
        probed captions are unknown (``duplicated`` None)."""
        if duplicated is None:
            return {}
        return {tags.guard_fire_rate(k): v for k, v in count_groups(self.fire_counts, over, duplicated > 0).items()}

    def gate_logs(self, flagged: int) -> dict[str, float]:
        """Share of this step's samples the gate left out, per group, and how many captions are flagged."""
        if self.gate_counts is None:
            return {}
        gated = torch.cat(self._gated, dim=1) if self._gated else torch.zeros(2, 0, dtype=torch.float64)
        self._gated = []
        drop, dup = self.gather(gated[0].float()).cpu(), self.gather(gated[1].float()).cpu() > 0
        out = {tags.GUARD_GATE_FLAGGED: float(flagged)}
        out.update({tags.guard_gate_rate(k): v for k, v in count_groups(self.gate_counts, drop, dup).items()})
        return out

    def totals(self) -> dict[str, float]:
        """Firing (and gate) rate per group over the whole run (nan: no probe of the group)."""
        counts = {"fire_rate": self.fire_counts, **({"gate_rate": self.gate_counts} if self.gate_counts is not None
                                                    else {})}
        return {f"{prefix}_{k}": float(c[2 * i] / c[2 * i + 1]) if c[2 * i + 1] > 0 else math.nan
                for prefix, c in counts.items() for i, k in enumerate(tags.FIRE_GROUPS)}

    def load_fire_counts(self, counts: Tensor | None) -> None:
        if counts is not None:
            self.fire_counts = counts.double().cpu().clone()

    def load_gate_counts(self, counts: Tensor) -> None:
        self.gate_counts = counts.double().cpu().clone()
