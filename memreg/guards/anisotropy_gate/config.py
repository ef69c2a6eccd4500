"""Settings of the anisotropy gate (``guard.type: anisotropy_gate``, alias ``penalty``): the top-level
``guard.*`` keys. :meth:`AnisotropyGateConfig.validate` holds every rule on them; the guard's parts
are built from a validated config and do not re-check it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from memreg.config_schema import ConfigError, choice

PENALTIES = ("anchor", "score")   # weight > 0: flagged rows pulled toward the base (.anchor), or the score's hinge
MODES = ("hinge", "mean")
PROBE_SIGNALS = ("combined", "norm", "align")   # what a probe's value is: g1*norm + g2*align, g1*norm, g2*align
ZSCORES = ("none", "calib", "batch")
GRAD_THROUGH = ("cond", "both")
REFERENCES = ("none", "base", "population", "base+population")
SOURCES = ("auto", "cache", "forward")
PRESETS = ("sd1", "sd2")
GATE_KEYS = ("image", "caption")   # what a flag names: a training image (its duplicate cluster), or a caption


PROBE_SHARE = 0.0625   # every_n_steps: auto: probe UNet samples per denoising sample, averaged over steps


def resolve_every_n(every_n_steps: Union[int, str], probe_samples: int, batch_size: int,
                    probe_share: float = PROBE_SHARE) -> int:
    """``every_n_steps: auto`` -> the smallest cadence at which the probes add at most ``probe_share``
    UNet samples per denoising sample: ``max(1, ceil(probe_samples / (probe_share * batch_size)))``.
    A probe sample is a no-grad forward, about a third of a trained sample's forward and backward,
    so the default share keeps the probes near 2% of a step's compute whatever the batch size
    (batch 32: every 2 steps; batch 2: every 32). An integer is used as given."""
    if every_n_steps != "auto":
        return int(every_n_steps)
    return max(1, math.ceil(probe_samples / (probe_share * max(int(batch_size), 1)) - 1e-9))


def uses_base(reference: str) -> bool:
    return reference in ("base", "base+population")


def uses_population(reference: str) -> bool:
    return reference in ("population", "base+population")


def check_reference(reference: str, source: str = "auto") -> None:
    """The rule on ``guard.reference`` and ``guard.reference_source`` (the config's and the reference's)."""
    choice(reference, REFERENCES, "guard.reference")
    choice(source, SOURCES, "guard.reference_source")


MAX_ANCHOR_WEIGHT = 1.0   # a flagged row's anchor weighs at most what an ordinary row's denoising loss weighs
MAX_FORCE_LIMIT = 1.0     # the score penalty's push on the probes at most the denoising loss's pull on the batch


def check_penalty(penalty: str, weight: float, max_force: float | None, gate: bool) -> None:
    """The rule on ``guard.penalty``, ``guard.weight`` and ``guard.max_force``: the penalty's damage is
    bounded at every accepted weight. ``anchor``: weight in [0, 1] and the gate on (its flags name the
    rows); ``score``: its gradient capped (``max_force`` in (0, 1]): uncapped, a firing probe's
    gradient at the UNet output was 22-74x the denoising loss's and weight 0.3 left the held-out
    loss at 3.7-9.4x the plain run's (README, "The penalty's weight")."""
    choice(penalty, PENALTIES, "guard.penalty")
    if weight < 0:
        raise ConfigError(f"guard.weight={weight} must be >= 0")
    if max_force is not None and not 0.0 < max_force <= MAX_FORCE_LIMIT:
        raise ConfigError(f"guard.max_force={max_force} must be in (0, {MAX_FORCE_LIMIT:g}] (or null with "
                          "guard.penalty: anchor)")
    if weight == 0:
        return
    if penalty == "anchor":
        if weight > MAX_ANCHOR_WEIGHT:
            raise ConfigError(f"guard.weight={weight} must be in [0, {MAX_ANCHOR_WEIGHT:g}] with guard.penalty: "
                              f"anchor (at {MAX_ANCHOR_WEIGHT:g} a flagged row counts as much as an ordinary row; "
                              "above it the base's predictions would outweigh the training data)")
        if not gate:
            raise ConfigError("guard.penalty: anchor needs guard.gate: true (the gate's flags name the rows it pulls "
                              "toward the base model)")
    elif max_force is None:
        raise ConfigError("guard.penalty: score with guard.weight > 0 needs guard.max_force (in (0, 1]): uncapped, "
                          "its gradient can be tens of times the denoising loss's")


def check_gate_weight(weight: float) -> None:
    """A flagged caption's weight must stay below 1: at 1 the gate would change nothing."""
    if not 0.0 <= weight < 1.0:
        raise ConfigError(f"guard.gate_weight={weight} must be in [0, 1) (1 would be no gate)")


def resolve_signal(term: str, reference: str) -> str:
    """``term: auto`` -> ``combined`` for the absolute threshold, ``norm`` for the reference modes
    (README's term comparison: the norm's growth over the base separates duplicated captions best)."""
    if term != "auto":
        return term
    return "combined" if reference == "none" else "norm"


@dataclass
class AnisotropyGateConfig:
    """Top-level ``guard.*`` keys. By default the probes only decide (``weight: 0``): a caption whose
    probe fires leaves the denoising loss (the gate); ``weight > 0`` also adds the penalty
    (``penalty: anchor``: the flagged rows come back with the base model's predictions as targets)."""

    penalty: str = "anchor"               # what weight > 0 adds: anchor (flagged rows pulled toward the base
                                          # model's predictions, .anchor) or score (the hinge on the probe score)
    weight: float = 0.0                   # anchor: a flagged row's weight in [0, 1]; score: the hinge's lambda;
                                          # 0: no penalty, the probes only feed the gate
    mode: str = "hinge"                   # score: hinge: mean(relu(s - tau)); mean: mean(s)
    tau: Union[float, str] = "auto"       # float (raw score units) or "auto"
    tau_quantile: float = 0.95            # q of tau: auto (upper tail of ordinary captions)
    tau_ema: float = 0.0                  # > 0: tau <- (1-b) tau + b * q-quantile of each step's probes
    probes_per_step: int = 2              # k captions of the batch probed per active step
    every_n_steps: Union[int, str] = "auto"  # probes on optimizer steps with step % n == 0; auto: from probe_share
    probe_share: float = PROBE_SHARE      # every_n_steps: auto: probe samples per denoising sample (resolve_every_n)
    warmup_steps: int = 0                 # no probes before this optimizer step
    term: str = "auto"                    # combined: g1*norm + g2*align; norm: g1*norm; align: g2*align (half the
                                          # probes); auto: combined with reference none, norm with the others
    zscore: str = "calib"                 # none | calib (divide by calibration std) | batch (z over the step's probes)
    max_force: Union[float, None] = 1.0   # score: cap on a firing step's penalty gradient at the UNet output,
                                          # as a multiple of the denoising loss's, in (0, 1]
    grad_through: str = "both"            # both: the score's gradient flows through eps(c) and eps(empty); cond:
                                          # eps(empty), shared by every caption, is detached
    tau_z: float = 1.645                  # hinge threshold in z units for zscore: batch
    preset: Union[str, None] = None       # sd1 | sd2 | None: memreg.score.make_scorer's rule for the model
    t_hi: Union[int, None] = None
    t_lo: Union[int, None] = None
    calibration_prompts: int = 64
    calibration_seeds: int = 2
    fused_forward: bool = True            # probes ride in the denoising UNet forward
    probe_checkpointing: Union[bool, str] = "auto"  # activation checkpointing on probe steps; auto: when the
                                                    # run does not checkpoint anyway and the probes would add
                                                    # > PROBE_MEMORY_SHARE to the forward's samples
    # per-caption reference (memreg.guards.anisotropy_gate.reference); none: the absolute tau above
    reference: str = "base+population"    # none | base | population | base+population
    reference_source: str = "auto"        # base values: cache | forward (LoRA adapters off / ctx.reference) | auto
    reference_draws: int = 2              # cache: fixed noise draws per caption
    reference_margin: float = 0.0         # base: threshold on the growth; base+population: its floor (value units)
    population_k: float = 2.0             # population threshold: median + k * 1.4826 * MAD of recent probes
    population_window: int = 256          # how many recent captions' latest values (all processes) it is taken over
    population_min: int = 16              # no threshold before this many values were seen
    # caption gate (anisotropy_gate.gate): captions a probe found over the threshold leave the denoising loss
    gate: bool = True
    gate_weight: float = 0.0              # a flagged caption's sample weight in the denoising loss
    gate_release: bool = False            # true: a probe back under the threshold unflags the caption
    gate_key: str = "image"               # image: a flag takes every row of the probed image (its duplicate
                                          # cluster) out, whatever its caption; caption: rows with that caption

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a :class:`ConfigError` naming the first ``guard.<key>`` that cannot run."""
        choice(self.mode, MODES, "guard.mode")
        choice(self.term, PROBE_SIGNALS + ("auto",), "guard.term")
        self._validate_reference()
        choice(self.zscore, ZSCORES, "guard.zscore")
        if isinstance(self.tau, str) and self.tau != "auto":
            raise ConfigError(f"guard.tau={self.tau!r} must be a number or 'auto'")
        if not 0.0 < self.tau_quantile < 1.0:
            raise ConfigError(f"guard.tau_quantile={self.tau_quantile} must be in (0, 1)")
        if self.preset is not None:
            choice(self.preset, PRESETS, "guard.preset")
        if isinstance(self.every_n_steps, str) and self.every_n_steps != "auto":
            raise ConfigError(f"guard.every_n_steps={self.every_n_steps!r} must be an integer >= 1 or 'auto'")
        if (self.probes_per_step < 1 or (not isinstance(self.every_n_steps, str) and self.every_n_steps < 1)
                or self.warmup_steps < 0):
            raise ConfigError("guard.probes_per_step and guard.every_n_steps must be >= 1, guard.warmup_steps >= 0")
        if not 0.0 < self.probe_share <= 1.0:
            raise ConfigError(f"guard.probe_share={self.probe_share} must be in (0, 1]")
        if self.zscore == "batch" and self.probes_per_step < 2:
            raise ConfigError("guard.zscore: batch needs guard.probes_per_step >= 2")
        if not 0.0 <= self.tau_ema < 1.0:
            raise ConfigError(f"guard.tau_ema={self.tau_ema} must be in [0, 1)")
        if isinstance(self.probe_checkpointing, str) and self.probe_checkpointing != "auto":
            raise ConfigError(f"guard.probe_checkpointing={self.probe_checkpointing!r} must be true, false or 'auto'")
        check_penalty(self.penalty, self.weight, self.max_force, self.gate)
        choice(self.grad_through, GRAD_THROUGH, "guard.grad_through")
        check_gate_weight(self.gate_weight)
        choice(self.gate_key, GATE_KEYS, "guard.gate_key")
        if self.calibration_prompts < 1 or self.calibration_seeds < 1:
            raise ConfigError("guard.calibration_prompts and guard.calibration_seeds must be >= 1")

    def _validate_reference(self) -> None:
        check_reference(self.reference, self.reference_source)
        if (self.reference_draws < 1 or self.population_window < 1
                or not 1 <= self.population_min <= self.population_window):
            raise ConfigError("guard.reference_draws and guard.population_window must be >= 1, guard.population_min "
                              f"in [1, population_window] (got {self.reference_draws}, {self.population_window}, "
                              f"{self.population_min})")
        if self.population_k < 0:
            raise ConfigError(f"guard.population_k={self.population_k} must be >= 0")
        if self.reference != "none" and self.zscore == "batch":
            raise ConfigError(f"guard.zscore: batch cannot be combined with guard.reference: {self.reference} "
                              "(use zscore calib or none)")
        if self.reference != "none" and self.tau_ema > 0:
            raise ConfigError("guard.tau_ema applies to guard.reference: none only (the reference modes use "
                              "guard.population_* instead)")

    @property
    def anchored(self) -> bool:
        """The anchor penalty is on (flagged rows pulled toward the base model)."""
        return self.penalty == "anchor" and self.weight > 0

    @property
    def needs_base_model(self) -> bool:
        """Whether the guard runs the base model beside the trained one (the anchor's targets, or base
        values by forward): full fine-tuning must then keep a frozen copy of the base UNet."""
        return self.anchored or (uses_base(self.reference) and self.reference_source == "forward")

    @property
    def signal(self) -> str:
        """The probe signal ``term`` resolves to (see :func:`resolve_signal`)."""
        return resolve_signal(self.term, self.reference)
