"""Model setup for training: checks before loading, LoRA / full fine-tuning, precision, EMA."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel, cast_training_params
from peft import LoraConfig, inject_adapter_in_model

from memreg.models import SDComponents, check_model_path, load_components
from memreg.training.config import ConfigError, keeps_base_copy

logger = logging.getLogger(__name__)


def check_prediction_type(cfg) -> str:
    """The model's prediction type; a contradicting ``prediction_type`` fails before any weights load."""
    check_model_path(cfg.pretrained_model_name_or_path)
    sched_cfg = DDPMScheduler.load_config(cfg.pretrained_model_name_or_path, subfolder="scheduler",
                                          revision=cfg.revision)
    model_pt = sched_cfg.get("prediction_type", "epsilon")
    if cfg.prediction_type is not None and cfg.prediction_type != model_pt:
        raise ConfigError(
            f"prediction_type={cfg.prediction_type!r} contradicts the model {cfg.pretrained_model_name_or_path!r}, "
            f"whose scheduler predicts {model_pt!r}; drop prediction_type or set it to {model_pt!r}")
    return model_pt


@dataclass
class TrainModels:
    components: SDComponents
    unet: torch.nn.Module             # unwrapped, trainable (LoRA-adapted or full)
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: Any
    noise_scheduler: Any
    weight_dtype: torch.dtype
    trainable_params: list            # what the optimizer updates and the clipper clips
    train_text_encoder: bool
    ema: Any = None
    text_encoder_2: Any = None        # SDXL's second (projected) text encoder; trained with the first
    reference: Any = None             # full fine-tuning: a frozen copy of the base UNet (config.keeps_base_copy)

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


def add_lora_adapter(model, config) -> None:
    """``model.add_adapter(config)``; for a transformers model whose PEFT integration refuses the
    installed peft version, inject the adapter with peft itself (same modules, same state-dict keys)."""
    try:
        model.add_adapter(config)
    except ValueError as e:
        if "PEFT" not in str(e):
            raise
        logger.warning("%s; injecting the LoRA adapter with peft directly", e)
        inject_adapter_in_model(config, model, adapter_name="default")
        model.peft_config = {"default": config}


def move_model(model, device, dtype) -> None:
    """Move ``model`` to ``device`` and ``dtype``, casting only when a parameter has another dtype
    (diffusers warns on every dtype cast)."""
    if any(p.dtype != dtype for p in model.parameters()):
        model.to(device, dtype=dtype)
    else:
        model.to(device)


def setup_models(cfg, device, mixed_precision: str | None) -> TrainModels:
    comps = load_components(cfg.pretrained_model_name_or_path, revision=cfg.revision, variant=cfg.variant,
                            dtype=torch.float32, device="cpu", with_vae=True,
                            vae_model=cfg.pretrained_vae_model_name_or_path)
    unet, te, vae = comps.unet, comps.text_encoder, comps.vae
    tes = comps.text_encoders   # [te] for SD 1.x/2.x, [te, te_2] for SDXL
    wdtype = weight_dtype_for(mixed_precision)
    ema = reference = None
    if cfg.mode == "lora":
        unet.requires_grad_(False)
        move_model(unet, device, wdtype)
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha or cfg.rank, init_lora_weights="gaussian",
                                    target_modules=list(cfg.lora_target_modules)))
        for enc in tes:
            enc.requires_grad_(False)
            move_model(enc, device, wdtype)
            if cfg.train_text_encoder:
                add_lora_adapter(enc, LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha or cfg.rank,
                                                 init_lora_weights="gaussian",
                                                 target_modules=list(cfg.text_encoder_lora_target_modules)))
        if wdtype != torch.float32:
            cast_training_params([unet, *tes] if cfg.train_text_encoder else [unet], dtype=torch.float32)
    else:
        if keeps_base_copy(cfg):
            reference = copy.deepcopy(unet).requires_grad_(False).eval()
            move_model(reference, device, wdtype)
        move_model(unet, device, torch.float32)
        unet.requires_grad_(True)
        for enc in tes:
            enc.requires_grad_(cfg.train_text_encoder)
            move_model(enc, device, torch.float32 if cfg.train_text_encoder else wdtype)
        if cfg.use_ema:
            ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=UNet2DConditionModel,
                           model_config=unet.config)
            ema.to(device)
    vae.requires_grad_(False)
    move_model(vae, device, wdtype)
    unet.train()
    if cfg.train_text_encoder:
        for enc in tes:
            enc.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for enc in tes:
                enc.gradient_checkpointing_enable()
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    params = [p for p in unet.parameters() if p.requires_grad]
    if cfg.train_text_encoder:
        params += [p for enc in tes for p in enc.parameters() if p.requires_grad]
    return TrainModels(components=comps, unet=unet, text_encoder=te, vae=vae, tokenizer=comps.tokenizer,
                       noise_scheduler=comps.scheduler, weight_dtype=wdtype, trainable_params=params,
                       train_text_encoder=cfg.train_text_encoder, ema=ema, text_encoder_2=comps.text_encoder_2,
                       reference=reference)


def clip_trainable_grads(accelerator, params: list, max_norm: float | None) -> float | None:
    """Clip the gradients of ``params`` (a list, never a one-shot iterator); returns the pre-clip norm."""
    if not max_norm:
        return None
    if not isinstance(params, (list, tuple)):
        raise TypeError("clip_trainable_grads needs a list of parameters (an iterator would be exhausted)")
    norm = accelerator.clip_grad_norm_(params, max_norm)
    return float(norm) if norm is not None else None
