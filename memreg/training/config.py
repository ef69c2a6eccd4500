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
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from memreg.config_schema import (ConfigError, apply_mapping, choice, field_type, flat_dict, given_keys, load_yaml,
                                  set_key, unknown_key_error)
from memreg.config_schema import valid_keys as _schema_keys
from memreg.guards.registry import GuardConfig, guard_spec
from memreg.monitor_config import EvalConfig
from memreg.training.captions import from_train_config as caption_config

__all__ = ["ConfigError", "TrainConfig", "GuardConfig", "load_config", "save_config", "valid_keys", "flat_dict",
           "to_dict", "load_yaml", "apply_mapping", "validate"]

logger = logging.getLogger(__name__)

TRAIN_MODES = ("lora", "full")
MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass
class TrainConfig:
    # model
    pretrained_model_name_or_path: Union[str, None] = None
    revision: Union[str, None] = None
    variant: Union[str, None] = None
    # a VAE of its own (diffusers' SDXL scripts' flag, e.g. the fp16-fix VAE): a dir or hub id with the VAE at its root
    pretrained_vae_model_name_or_path: Union[str, None] = None
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
    cache_text_embeddings: int = 0        # keep this many captions' frozen text-encoder outputs (0: encode each step)
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


def valid_keys(cls=None, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the training config (or of ``cls``)."""
    return _schema_keys(TrainConfig if cls is None else cls, prefix)


# --------------------------------------------------------------------------- CLI

def _is_bool_key(dotted: str) -> bool:
    return field_type(TrainConfig, dotted) is bool


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
                    raise unknown_key_error(key, TrainConfig, "command line")
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
        given = given_keys(data)
    else:
        given = []
    for key, value in cli_overrides:
        set_key(cfg, key, value, "command line")
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value, "overrides")
    validate(cfg)
    warn_inactive_eval_keys(cfg, given + [k for k, _ in cli_overrides] + list(overrides or {}))
    return cfg


# --------------------------------------------------------------------------- validation

def validate(cfg: TrainConfig) -> None:
    """Static checks that need no files (files are checked by data/model setup, still before training)."""
    if cfg.resolution <= 0 or cfg.resolution % 8 != 0:
        raise ConfigError(f"resolution={cfg.resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")
    choice(cfg.mode, TRAIN_MODES, "mode")
    if cfg.mixed_precision is not None:
        choice(cfg.mixed_precision, MIXED_PRECISION, "mixed_precision")
    if cfg.prediction_type is not None:
        choice(cfg.prediction_type, PREDICTION_TYPES, "prediction_type")
    choice(cfg.lr_scheduler, LR_SCHEDULERS, "lr_scheduler")
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
    if cfg.cache_text_embeddings and cfg.train_text_encoder:
        raise ConfigError("cache_text_embeddings keeps a frozen text encoder's outputs; it cannot be combined "
                          "with train_text_encoder")
    if cfg.dataset_name is None and cfg.train_data_dir is None:
        raise ConfigError("give a dataset: set train_data_dir (an imagefolder with metadata.jsonl) or dataset_name")
    if cfg.dataset_name is not None and cfg.train_data_dir is not None:
        raise ConfigError("set only one of dataset_name and train_data_dir")
    if cfg.pretrained_model_name_or_path is None:
        raise ConfigError("pretrained_model_name_or_path is required")
    vae = cfg.pretrained_vae_model_name_or_path
    if vae is not None and not Path(vae).is_dir() and (vae.startswith((".", "/", "~")) or vae.count("/") != 1):
        raise ConfigError(f"pretrained_vae_model_name_or_path {vae!r}: no such directory, and not a hub id owner/name")
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
    try:
        cfg.eval.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg.guard.validate()


def keeps_base_copy(cfg) -> bool:
    """Full fine-tuning with a guard that runs the base model beside the trained one (the anchor
    penalty, or base values by forward): the trainer keeps a frozen copy of the base UNet, in the
    weight dtype (its memory: one UNet, no gradients or optimizer state). LoRA runs the base by
    disabling the adapters instead."""
    g = cfg.guard
    return cfg.mode == "full" and guard_spec(g.type).name == "anisotropy_gate" and g.needs_base_model


# Bounded float settings: key -> (the rule as the error states it, the check). Floats are finite already
# (config_schema.coerce); these are the ranges the optimizer and the noise schedule need.
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
    for key in ("lr_warmup_steps", "dataloader_num_workers", "cache_text_embeddings"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0")


# eval keys the guard reads too (the run's item index), so they act with the monitor off
GUARD_EVAL_KEYS = ("eval.enabled", "eval.dup_min_count", "eval.duplicates_from", "eval.item_clusters",
                   "eval.item_clusters_dir")


def warn_inactive_eval_keys(cfg: TrainConfig, given: list[str]) -> list[str]:
    """Log a warning naming the ``eval.*`` keys given while the monitor is off (they do nothing)."""
    inactive = sorted({k for k in given if k.startswith("eval.") and k not in GUARD_EVAL_KEYS})
    if inactive and not cfg.eval.enabled:
        logger.warning("eval.enabled is false, so the memorization monitor is off and these keys have no effect: "
                       "%s (set eval.enabled: true to monitor)", ", ".join(inactive))
    return inactive if not cfg.eval.enabled else []


# --------------------------------------------------------------------------- output

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
