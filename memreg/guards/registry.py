"""The guard registry: each entry names a guard, its guard class and its config class.

A new guard is one module (a :class:`~memreg.guards.base.Guard` subclass and, if it has settings, a
dataclass with ``validate()``) plus one :class:`GuardSpec` line in ``GUARD_SPECS``. Its settings
become the ``guard.<section>.*`` keys of :class:`GuardConfig`, which is assembled from the specs, so
the training config needs no edit. The anisotropy gate's settings are the top-level ``guard.*`` keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union

from memreg.config_schema import ConfigError, apply_mapping, choice
from memreg.guards.agc import AGCConfig, AntiGradientControl
from memreg.guards.anisotropy_gate.config import AnisotropyGateConfig
from memreg.guards.anisotropy_gate.guard import AnisotropyGateGuard
from memreg.guards.base import Guard, GuardContext, NoGuard
from memreg.guards.caption_noise import CaptionNoiseConfig, CaptionNoiseGuard
from memreg.guards.wen_filter import WenFilterConfig, WenFilterGuard


@dataclass(frozen=True)
class GuardSpec:
    """``name`` (the ``guard.type`` value), the guard class, its config dataclass (None: no
    settings) and the ``guard.<section>`` key holding that config (None: the top-level keys)."""

    name: str
    guard: type[Guard]
    config: Union[type, None] = None
    section: Union[str, None] = None
    aliases: tuple[str, ...] = ()


GUARD_SPECS: tuple[GuardSpec, ...] = (
    GuardSpec("none", NoGuard),
    GuardSpec("anisotropy_gate", AnisotropyGateGuard, AnisotropyGateConfig, aliases=("penalty",)),
    GuardSpec("wen_filter", WenFilterGuard, WenFilterConfig, section="wen"),
    GuardSpec("caption_noise", CaptionNoiseGuard, CaptionNoiseConfig, section="caption_noise"),
    GuardSpec("agc", AntiGradientControl, AGCConfig, section="agc"),
)

GUARDS: dict[str, GuardSpec] = {s.name: s for s in GUARD_SPECS}
ALIASES: dict[str, str] = {alias: s.name for s in GUARD_SPECS for alias in s.aliases}


def _validate(self) -> None:
    choice(self.type, tuple(GUARDS) + tuple(ALIASES), "guard.type")
    AnisotropyGateConfig.validate(self)
    for spec in GUARD_SPECS:
        if spec.section is not None:
            getattr(self, spec.section).validate()


GuardConfig = dataclasses.make_dataclass(
    "GuardConfig",
    [("type", str, field(default="none")),              # a GUARDS name
     ("seed", Union[int, None], field(default=None))]   # the guard's own generator; None: training seed + 1
    + [(s.section, s.config, field(default_factory=s.config)) for s in GUARD_SPECS if s.section is not None],
    bases=(AnisotropyGateConfig,),
    namespace={"validate": _validate,
               "__doc__": "``guard.*``: ``type`` selects the guard; the top-level keys configure the anisotropy "
                          "gate (:class:`AnisotropyGateConfig`), each other guard has its section."},
)
GuardConfig.__module__ = __name__


def guard_spec(name: str) -> GuardSpec:
    """The spec ``name`` (a ``guard.type`` value or an alias) names."""
    name = ALIASES.get(name, name)
    if name not in GUARDS:
        raise ConfigError(f"unknown guard type {name!r}; choose one of {list(GUARDS)}")
    return GUARDS[name]


def guard_class(name: str) -> type[Guard]:
    return guard_spec(name).guard


def guard_config(mapping: dict | None = None) -> GuardConfig:
    """A validated :class:`GuardConfig` from ``guard:`` keys (nested dict or dotted keys)."""
    cfg = GuardConfig()
    apply_mapping(cfg, dict(mapping or {}), source="guard config", prefix="guard.")
    cfg.validate()
    return cfg


def build_guard(cfg, ctx: GuardContext) -> Guard:
    """The guard ``cfg.type`` names; ``cfg``: a :class:`GuardConfig` or a dict of ``guard:`` keys."""
    if cfg is None or isinstance(cfg, dict):
        cfg = guard_config(cfg)
    return guard_class(cfg.type).from_config(cfg, ctx)
