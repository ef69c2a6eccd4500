"""Training configuration: nested dataclasses, YAML + diffusers-style CLI overrides.

A run is ``--config configs/x.yaml`` plus flags that win over the YAML::

    python train/train.py --config configs/tiny_cpu.yaml --max_train_steps 6 --output_dir out \
        --guard.type penalty --guard.weight 0.5 --eval.enabled true

Top-level keys keep the names of diffusers' ``train_text_to_image*.py`` flags; nested sections
are addressed with dots (``guard.``, ``guard.wen.``, ``guard.caption_noise.``, ``guard.agc.``, ``eval.``). A
boolean flag given without a value means ``true`` (``--center_crop``). An unknown key fails with
a :class:`ConfigError` naming it and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from memreg.errors import MemregError
from memreg.guards.agc import AGCConfig
from memreg.guards.caption_noise import CaptionNoiseConfig
from memreg.guards.penalty import GRAD_THROUGH, MODES, TERMS, ZSCORES, PenaltyConfig
from memreg.guards.reference import REFERENCES, SOURCES, uses_base
from memreg.guards.registry import GUARDS
from memreg.guards.wen_filter import WenFilterConfig
from memreg.monitor_config import EvalConfig
from memreg.training.captions import from_train_config as caption_config


logger = logging.getLogger(__name__)


class ConfigError(MemregError, ValueError):
    """A configuration that cannot run; the message names the key."""


GUARD_TYPES = tuple(GUARDS)
PENALTY_MODES = MODES
PENALTY_TERMS = TERMS
ZSCORE_MODES = ZSCORES
TRAIN_MODES = ("lora", "full")
MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


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


@dataclass
class GuardConfig(PenaltyConfig):
    """``guard.type`` selects the memorization guard (:mod:`memreg.guards`); the top-level keys
    configure the penalty (:class:`~memreg.guards.penalty.PenaltyConfig`), each baseline has a section."""

    type: str = "none"                    # none | penalty | wen_filter | caption_noise | agc
    seed: Union[int, None] = None         # the guard's own generator; None: training seed + 1
    wen: WenFilterConfig = field(default_factory=WenFilterConfig)
    caption_noise: CaptionNoiseConfig = field(default_factory=CaptionNoiseConfig)
    agc: AGCConfig = field(default_factory=AGCConfig)


@dataclass
class TrainConfig:
    # model
    pretrained_model_name_or_path: Union[str, None] = None
    revision: Union[str, None] = None
    variant: Union[str, None] = None
    prediction_type: Union[str, None] = None
    mode: str = "lora"                    # lora | full
    train_text_encoder: bool = False
    # data
    dataset_name: Union[str, None] = None
    dataset_config_name: Union[str, None] = None
    train_data_dir: Union[str, None] = None
    image_column: str = "image"
    caption_column: str = "text"
    max_train_samples: Union[int, None] = None
    proportion_empty_prompts: float = 0.0   # captions replaced by "" (trains the unconditional branch CFG needs)
    # caption augmentation and repeats, kohya-ss/sd-scripts' names and semantics (memreg.training.captions)
    shuffle_caption: bool = False         # shuffle the caption's tags after the first keep_tokens
    keep_tokens: int = 0                  # leading tags kept in place by shuffle and tag dropout
    caption_separator: str = ","          # splits a caption into tags (re-joined with ", ")
    caption_dropout_rate: float = 0.0     # whole caption -> "" with this probability (first)
    caption_tag_dropout_rate: float = 0.0  # each non-kept tag dropped with this probability (after the shuffle)
    num_repeats: int = 1                  # each training image this many times per epoch
    repeats_from_folders: bool = False    # an image in train_data_dir/N_name/ is repeated N times
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    cache_latents: bool = False
    dataloader_num_workers: int = 0
    cache_dir: Union[str, None] = None
    allow_external_files: bool = False      # let metadata.jsonl name files outside train_data_dir (../, symlinks)
    # optimisation
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    max_train_steps: Union[int, None] = None
    num_train_epochs: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: Union[str, None] = None
    gradient_checkpointing: bool = False
    allow_tf32: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    snr_gamma: Union[float, None] = None
    noise_offset: float = 0.0
    seed: Union[int, None] = None
    # LoRA
    rank: int = 4
    lora_alpha: Union[int, None] = None   # None: = rank
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    text_encoder_lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    # outputs, checkpoints, logging
    output_dir: str = "sd-model-finetuned"
    overwrite_output_dir: bool = False
    logging_dir: str = "logs"
    report_to: str = "tensorboard"
    tracker_project_name: str = "memreg"
    checkpointing_steps: int = 500
    checkpoints_total_limit: Union[int, None] = None
    resume_from_checkpoint: Union[str, None] = None
    # resume from a checkpoint that lacks RNG/optimizer/scheduler state with a loud warning instead of an error
    allow_incomplete_checkpoint: bool = False
    stop_at_step: Union[int, None] = None   # end after this optimizer step without final outputs (as if preempted)
    # sections
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- typed coercion

_TRUE = {"true", "yes", "1", "on", "y"}
_FALSE = {"false", "no", "0", "off", "n"}
_NONE = {"none", "null", "~", ""}


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _union_args(tp) -> tuple | None:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        return typing.get_args(tp)
    return None


def _coerce(value: Any, tp, key: str) -> Any:
    """Convert ``value`` (a YAML value or a CLI string) to the field type ``tp``."""
    args = _union_args(tp)
    if args is not None:
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        errors = []
        # Try the non-str members first so "0.5" becomes a float in float|str fields.
        members = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
        for member in members:
            try:
                return _coerce(value, member, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot use {value!r} ({'; '.join(errors)})")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (str,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE:
            return True
        if isinstance(value, str) and value.strip().lower() in _FALSE:
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
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
    if tp is float:
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
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


# --------------------------------------------------------------------------- key registry

def valid_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config dataclass."""
    keys = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _section_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.append(prefix + f.name)
            keys += _section_keys(tp, prefix + f.name + ".")
    return keys


def unknown_key_error(key: str, source: str = "") -> ConfigError:
    candidates = valid_keys() + _section_keys()
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    leaf = key.rsplit(".", 1)[-1]
    leaf_close = difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1] for c in candidates], n=1, cutoff=0.6)
    if leaf_close and not close:
        close = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf_close[0]][:1]
    where = f" in {source}" if source else ""
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def _set(cfg, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        hints = _type_hints(type(obj))
        if part not in hints:
            raise unknown_key_error(dotted, source)
        tp = hints[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted}: is a section; give a mapping or set {dotted}.<key>")
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v, source)
                return
            setattr(obj, part, _coerce(value, tp, dotted))
            return
        if not dataclasses.is_dataclass(tp):
            raise unknown_key_error(dotted, source)
        obj = getattr(obj, part)


def apply_mapping(cfg: TrainConfig, mapping: dict, source: str = "", prefix: str = "") -> None:
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            # a section or an unknown key holding a mapping
            _set(cfg, key, v, source)
        else:
            _set(cfg, key, v, source)


# --------------------------------------------------------------------------- CLI

def _is_bool_key(dotted: str) -> bool:
    obj_cls = TrainConfig
    parts = dotted.split(".")
    for part in parts[:-1]:
        hints = _type_hints(obj_cls)
        tp = hints.get(part)
        if tp is None or not dataclasses.is_dataclass(tp):
            return False
        obj_cls = tp
    tp = _type_hints(obj_cls).get(parts[-1])
    return tp is bool


def parse_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, Any]]]:
    """Split argv into the ``--config`` path and ordered (key, raw value) overrides."""
    config_path = None
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --key value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            key = key.replace("-", "_")
            i += 1
        else:
            key = body.replace("-", "_")
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                if key == "config" or not _is_bool_key(key):
                    if key in valid_keys() or key == "config":
                        raise ConfigError(f"--{key} needs a value")
                    raise unknown_key_error(key, "command line")
                value = "true"
                i += 1
            else:
                value = nxt
                i += 2
        if key == "config":
            config_path = value
        else:
            overrides.append((key, value))
    return config_path, overrides


def load_config(argv: list[str] | None = None, config_path: str | None = None,
                overrides: dict | None = None) -> TrainConfig:
    """Defaults <- YAML (``--config`` or ``config_path``) <- CLI flags <- ``overrides``; validated."""
    cli_path, cli_overrides = parse_cli(list(argv or []))
    path = cli_path or config_path
    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        apply_mapping(cfg, data, source=str(p))
        given = _given_keys(data)
    else:
        given = []
    for key, value in cli_overrides:
        _set(cfg, key, value, "command line")
    for key, value in (overrides or {}).items():
        _set(cfg, key, value, "overrides")
    validate(cfg)
    warn_inactive_eval_keys(cfg, given + [k for k, _ in cli_overrides] + list(overrides or {}))
    return cfg


# --------------------------------------------------------------------------- validation

def _choice(value, choices, key):
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}{hint}")


def validate(cfg: TrainConfig) -> None:
    """Static checks that need no files (files are checked by data/model setup, still before training)."""
    if cfg.resolution <= 0 or cfg.resolution % 8 != 0:
        raise ConfigError(f"resolution={cfg.resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")
    _choice(cfg.mode, TRAIN_MODES, "mode")
    if cfg.mixed_precision is not None:
        _choice(cfg.mixed_precision, MIXED_PRECISION, "mixed_precision")
    if cfg.prediction_type is not None:
        _choice(cfg.prediction_type, PREDICTION_TYPES, "prediction_type")
    _choice(cfg.lr_scheduler, LR_SCHEDULERS, "lr_scheduler")
    if cfg.use_ema and cfg.mode != "full":
        raise ConfigError("use_ema applies to mode: full only (LoRA trains too few weights to average)")
    if not 0.0 <= cfg.proportion_empty_prompts < 1.0:
        raise ConfigError(f"proportion_empty_prompts={cfg.proportion_empty_prompts} must be in [0, 1)")
    try:
        caption_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train_text_encoder and cfg.mode == "full" and cfg.use_ema:
        raise ConfigError("use_ema keeps an EMA of the UNet only; it cannot be combined with train_text_encoder")
    if cfg.dataset_name is None and cfg.train_data_dir is None:
        raise ConfigError("give a dataset: set train_data_dir (an imagefolder with metadata.jsonl) or dataset_name")
    if cfg.dataset_name is not None and cfg.train_data_dir is not None:
        raise ConfigError("set only one of dataset_name and train_data_dir")
    if cfg.pretrained_model_name_or_path is None:
        raise ConfigError("pretrained_model_name_or_path is required")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps", "rank"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1:
        raise ConfigError(f"max_train_steps={cfg.max_train_steps} must be >= 1")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError("checkpoints_total_limit must be >= 1 (or null)")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ConfigError("max_grad_norm must be > 0")
    _check_ranges(cfg)
    if not 0.0 <= cfg.eval.heldout_fraction < 1.0:
        raise ConfigError(f"eval.heldout_fraction={cfg.eval.heldout_fraction} must be in [0, 1)")
    if hasattr(cfg.eval, "validate"):
        try:
            cfg.eval.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    validate_guard(cfg.guard)
    g = cfg.guard
    if (cfg.mode == "full" and g.type == "penalty" and g.reference_source == "forward"
            and uses_base(g.reference)):
        raise ConfigError("guard.reference_source: forward needs the base model next to the trained one; full "
                          "fine-tuning keeps no frozen copy, use guard.reference_source: cache (or auto)")


# Bounded float settings: key -> (the rule as the error states it, the check). Floats are finite already
# (_coerce); these are the ranges the optimizer and the noise schedule need.
FLOAT_RANGES: dict[str, tuple[str, Any]] = {
    "learning_rate": ("> 0", lambda v: v > 0),
    "adam_beta1": ("in [0, 1)", lambda v: 0 <= v < 1),
    "adam_beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "adam_weight_decay": (">= 0", lambda v: v >= 0),
    "adam_epsilon": ("> 0", lambda v: v > 0),
    "ema_decay": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "lr_power": ("> 0", lambda v: v > 0),
    "noise_offset": (">= 0", lambda v: v >= 0),
    "snr_gamma": ("> 0 (or null)", lambda v: v > 0),
}


def _check_ranges(cfg: TrainConfig) -> None:
    """Every bounded setting inside its range: a negative learning rate or a beta of 1 would otherwise
    reach the optimizer and end in its traceback."""
    for key, (rule, ok) in FLOAT_RANGES.items():
        value = getattr(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value} must be {rule}")
    for key in ("lr_warmup_steps", "dataloader_num_workers"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0")


def validate_guard(g: GuardConfig) -> None:
    _choice(g.type, GUARD_TYPES, "guard.type")
    _choice(g.mode, PENALTY_MODES, "guard.mode")
    _choice(g.term, PENALTY_TERMS + ("auto",), "guard.term")
    _validate_reference(g)
    _choice(g.zscore, ZSCORE_MODES, "guard.zscore")
    if isinstance(g.tau, str) and g.tau != "auto":
        raise ConfigError(f"guard.tau={g.tau!r} must be a number or 'auto'")
    if isinstance(g.wen.tau, str) and g.wen.tau != "auto":
        raise ConfigError(f"guard.wen.tau={g.wen.tau!r} must be a number or 'auto'")
    for key, q in (("guard.tau_quantile", g.tau_quantile), ("guard.wen.tau_quantile", g.wen.tau_quantile)):
        if not 0.0 < q < 1.0:
            raise ConfigError(f"{key}={q} must be in (0, 1)")
    if g.preset is not None:
        _choice(g.preset, ("sd1", "sd2"), "guard.preset")
    if g.probes_per_step < 1 or g.every_n_steps < 1 or g.warmup_steps < 0:
        raise ConfigError("guard.probes_per_step and guard.every_n_steps must be >= 1, guard.warmup_steps >= 0")
    if g.zscore == "batch" and g.probes_per_step < 2:
        raise ConfigError("guard.zscore: batch needs guard.probes_per_step >= 2")
    if not 0.0 <= g.tau_ema < 1.0:
        raise ConfigError(f"guard.tau_ema={g.tau_ema} must be in [0, 1)")
    if isinstance(g.probe_checkpointing, str) and g.probe_checkpointing != "auto":
        raise ConfigError(f"guard.probe_checkpointing={g.probe_checkpointing!r} must be true, false or 'auto'")
    if g.weight < 0:
        raise ConfigError(f"guard.weight={g.weight} must be >= 0")
    _choice(g.grad_through, GRAD_THROUGH, "guard.grad_through")
    if not 0.0 <= g.gate_weight < 1.0:
        raise ConfigError(f"guard.gate_weight={g.gate_weight} must be in [0, 1) (1 would be no gate)")
    if g.max_force is not None and not g.max_force > 0:
        raise ConfigError(f"guard.max_force={g.max_force} must be > 0 (or null: no cap)")
    if g.calibration_prompts < 1 or g.calibration_seeds < 1:
        raise ConfigError("guard.calibration_prompts and guard.calibration_seeds must be >= 1")
    cn = g.caption_noise
    if not 0.0 <= cn.word_prob <= 1.0 or cn.num_words < 0 or cn.embed_noise < 0:
        raise ConfigError("guard.caption_noise: word_prob in [0, 1], num_words >= 0, embed_noise >= 0")
    if g.agc.mem_ratio <= 0 or not 0.0 <= g.agc.decay < 1.0:
        raise ConfigError(f"guard.agc: mem_ratio must be > 0 and decay in [0, 1) (got {g.agc.mem_ratio}, {g.agc.decay})")


def _validate_reference(g: GuardConfig) -> None:
    _choice(g.reference, REFERENCES, "guard.reference")
    _choice(g.reference_source, SOURCES, "guard.reference_source")
    if g.reference_draws < 1 or g.population_window < 1 or not 1 <= g.population_min <= g.population_window:
        raise ConfigError("guard.reference_draws and guard.population_window must be >= 1, guard.population_min "
                          f"in [1, population_window] (got {g.reference_draws}, {g.population_window}, "
                          f"{g.population_min})")
    if g.population_k < 0:
        raise ConfigError(f"guard.population_k={g.population_k} must be >= 0")
    if g.reference != "none" and g.zscore == "batch":
        raise ConfigError(f"guard.zscore: batch cannot be combined with guard.reference: {g.reference} "
                          "(use zscore calib or none)")
    if g.reference != "none" and g.tau_ema > 0:
        raise ConfigError(f"guard.tau_ema applies to guard.reference: none only (the reference modes use "
                          f"guard.population_* instead)")


def warn_inactive_eval_keys(cfg: TrainConfig, given: list[str]) -> list[str]:
    """Log a warning naming the ``eval.*`` keys given while the monitor is off (they do nothing)."""
    inactive = sorted({k for k in given if k.startswith("eval.") and k != "eval.enabled"})
    if inactive and not cfg.eval.enabled:
        logger.warning("eval.enabled is false, so the memorization monitor is off and these keys have no effect: "
                       "%s (set eval.enabled: true to monitor)", ", ".join(inactive))
    return inactive if not cfg.eval.enabled else []


def _given_keys(mapping: dict, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a (nested) YAML mapping."""
    keys = []
    for k, v in mapping.items():
        keys += _given_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


# --------------------------------------------------------------------------- output

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


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

    walk(to_dict(cfg), "")
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
