"""``build_guard(cfg, ctx)``: ``guard.type`` -> the guard class, imported lazily (as ``memreg.cli``'s
commands). A new guard is one module here with a :class:`~memreg.guards.base.Guard` subclass (and
its config dataclass, added as a ``guard.<section>`` field of ``GuardConfig``) plus one line below."""

from __future__ import annotations

import importlib

from memreg.guards.base import Guard, GuardContext

GUARDS: dict[str, str] = {
    "none": "memreg.guards.base:NoGuard",
    "penalty": "memreg.guards.penalty:PenaltyGuard",
    "wen_filter": "memreg.guards.wen_filter:WenFilterGuard",
    "caption_noise": "memreg.guards.caption_noise:CaptionNoiseGuard",
    "agc": "memreg.guards.agc:AntiGradientControl",
}


def guard_class(name: str) -> type[Guard]:
    if name not in GUARDS:
        raise ValueError(f"unknown guard type {name!r}; choose one of {list(GUARDS)}")
    module, attr = GUARDS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def guard_config(mapping: dict | None = None):
    """A ``GuardConfig`` from the ``guard:`` keys of a training config (nested dict or dotted keys),
    checked as ``train/train.py`` checks them."""
    from memreg.training.config import TrainConfig, apply_mapping, validate_guard

    cfg = TrainConfig()
    apply_mapping(cfg, {"guard": dict(mapping or {})}, source="guard config")
    validate_guard(cfg.guard)
    return cfg.guard


def build_guard(cfg, ctx: GuardContext) -> Guard:
    """The guard ``cfg.type`` names; ``cfg``: a ``GuardConfig`` or a dict of ``guard:`` keys."""
    if cfg is None or isinstance(cfg, dict):
        cfg = guard_config(cfg)
    return guard_class(cfg.type).from_config(cfg, ctx)
