"""Dataclass configs from YAML and command-line strings: typed coercion, dotted keys, key hints.

A config is a tree of dataclasses; a leaf is addressed by its dotted path (``guard.agc.decay``).
:func:`apply_mapping` sets leaves from a (nested or dotted) mapping, converting each value to its
field's type (:func:`coerce`); an unknown key fails with a :class:`ConfigError` naming it and the
closest valid key. Values are set one at a time onto a default instance, so a config checks its
cross-field rules in ``validate()`` once every key is set (the loaders call it).

Why not OmegaConf or pydantic: the behaviour and error texts users see are fixed by tests; OmegaConf
2.3's structured configs reject the ``Union[float, str]`` fields (``tau: auto | number``) and have no
finite-number check, and pydantic's multi-line validation errors would need translating back into
the one-line, key-naming messages the trainer promises. The engine is small and tested.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Union

import yaml

from memreg.errors import MemregError


class ConfigError(MemregError, ValueError):
    """A configuration that cannot run; the message names the key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """``yaml.safe_load`` that raises ``yaml.YAMLError`` on a duplicated key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


# --------------------------------------------------------------------------- typed coercion

_TRUE = {"true", "yes", "1", "on", "y"}
_FALSE = {"false", "no", "0", "off", "n"}
_NONE = {"none", "null", "~", ""}


def _union_args(tp) -> tuple | None:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        return typing.get_args(tp)
    return None


def coerce(value: Any, tp, key: str) -> Any:
    """``value`` (a YAML value or a CLI string) converted to the field type ``tp``; floats must be finite."""
    args = _union_args(tp)
    if args is not None:
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        errors = []
        # Try the non-str members first so "0.5" becomes a float in float|str fields.
        members = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
        for member in members:
            try:
                return coerce(value, member, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot use {value!r} ({'; '.join(errors)})")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (str,)
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, inner, key) for v in value]
    if tp is bool:
        return _to_bool(value, key)
    if tp is int:
        return _to_int(value, key)
    if tp is float:
        return _to_float(value, key)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _to_bool(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"{key}: expected true/false, got {value!r}")


def _to_int(value, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f.is_integer():
            return int(f)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _to_float(value, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    else:
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(number):  # nan/inf train to NaN weights or end in an optimizer traceback
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return number


# --------------------------------------------------------------------------- keys

def _walk(cls, prefix: str = ""):
    """(dotted key, is a section) for every field of ``cls`` and of its sections, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        yield prefix + f.name, dataclasses.is_dataclass(tp)
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, prefix + f.name + ".")


def valid_keys(cls, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the config dataclass ``cls``."""
    return [key for key, section in _walk(cls, prefix) if not section]


def section_keys(cls, prefix: str = "") -> list[str]:
    """The dotted keys of the sections (nested dataclasses) of ``cls``."""
    return [key for key, section in _walk(cls, prefix) if section]


def field_type(cls, dotted: str):
    """The type of the leaf or section ``dotted`` of ``cls``, or None when there is no such key."""
    tp = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return None
    return tp


def unknown_key_error(key: str, cls, source: str = "", prefix: str = "") -> ConfigError:
    """A :class:`ConfigError` for ``key`` (shown as ``prefix + key``) naming the closest key of ``cls``."""
    candidates = valid_keys(cls, prefix) + section_keys(cls, prefix)
    key = prefix + key
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    leaf = key.rsplit(".", 1)[-1]
    leaf_close = difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1] for c in candidates], n=1, cutoff=0.6)
    if leaf_close and not close:
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf_close[0]][:1]
    where = f" in {source}" if source else ""
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def set_key(cfg, dotted: str, value: Any, source: str = "", prefix: str = "") -> None:
    """Set the leaf ``dotted`` of ``cfg`` (a mapping value sets a section's keys); messages show
    ``prefix + dotted`` (the path of ``cfg`` inside a larger config)."""
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(type(obj))
        if part not in hints:
            raise unknown_key_error(dotted, type(cfg), source, prefix)
        tp = hints[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"{prefix}{dotted}: is a section; give a mapping or set {prefix}{dotted}.<key>")
                for k, v in value.items():
                    set_key(cfg, f"{dotted}.{k}", v, source, prefix)
                return
            setattr(obj, part, coerce(value, tp, prefix + dotted))
            return
        if not dataclasses.is_dataclass(tp):
            raise unknown_key_error(dotted, type(cfg), source, prefix)
        obj = getattr(obj, part)


def apply_mapping(cfg, mapping: dict, source: str = "", prefix: str = "") -> None:
    """Set every (nested or dotted) key of ``mapping`` on ``cfg``; see :func:`set_key`."""
    for k, v in mapping.items():
        set_key(cfg, str(k), v, source, prefix)


def given_keys(mapping: dict, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a (nested) mapping."""
    keys = []
    for k, v in mapping.items():
        keys += given_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def choice(value, choices, key: str) -> None:
    """Raise a :class:`ConfigError` unless ``value`` is one of ``choices`` (with a did-you-mean hint)."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}{hint}")


def flat_dict(cfg) -> dict[str, Any]:
    """Dotted keys -> values, lists and None stringified (for tracker hparams)."""
    out: dict[str, Any] = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif v is None or isinstance(v, (list, tuple)):
                out[f"{prefix}{k}"] = str(v)
            else:
                out[f"{prefix}{k}"] = v

    walk(dataclasses.asdict(cfg), "")
    return out
