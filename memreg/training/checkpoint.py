"""Checkpoints, resume and final outputs, in diffusers/peft formats (no pickled models).

* ``accelerator.save_state`` runs on every process; hooks registered here write the trainable
  weights as diffusers files (LoRA: ``pytorch_lora_weights.safetensors``, loadable by
  ``load_lora_weights``; full: ``unet/`` and ``unet_ema/`` model dirs) and pop them so accelerate
  does not also save ``model.safetensors``. Optimizer, LR scheduler and RNG states are accelerate's.
* Guard state (the penalty's generator and calibrated tau, the Wen filter's tau, the caption-noise
  generator) is written per process as ``guard_state_{rank}.safetensors`` (tensors) +
  ``guard_state_{rank}.json`` (scalars) and restored by the load hook.
* Final outputs: LoRA -> ``pytorch_lora_weights.safetensors`` (with the adapter's rank/alpha as
  metadata) and a kohya copy ``pytorch_lora_weights_kohya.safetensors`` (``lora_unet_*`` /
  ``lora_te_*`` keys, ``alpha`` = lora_alpha) for A1111/ComfyUI; full -> a diffusers pipeline dir.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"


class CheckpointError(ValueError):
    """A resume request or output directory that cannot be used; the message names the path."""


# --------------------------------------------------------------------------- directories

def check_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> None:
    """Refuse a non-empty output_dir unless resuming or ``overwrite_output_dir``."""
    p = Path(output_dir)
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"output_dir {output_dir!r} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not (resuming or overwrite):
        raise CheckpointError(f"output_dir {output_dir!r} is not empty; pass --overwrite_output_dir true to write "
                              "into it, or --resume_from_checkpoint latest to continue a run")


def step_of(path: str | Path) -> int:
    m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    if not m:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint directory ({CHECKPOINT_PREFIX}<step>)")
    return int(m.group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    p = Path(output_dir)
    if not p.is_dir():
        return []
    dirs = [d for d in p.iterdir() if d.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", d.name)]
    return sorted(dirs, key=step_of)


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """The checkpoint dir to resume from: ``latest`` (None if there is none yet) or a path/name."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            logger.warning("resume_from_checkpoint=latest: no checkpoint in %s; starting a new run", output_dir)
            return None
        return ckpts[-1]
    for cand in (Path(resume), Path(output_dir) / resume):
        if cand.is_dir():
            step_of(cand)
            return cand
    raise CheckpointError(f"resume_from_checkpoint {resume!r}: no such checkpoint (looked in {output_dir!r})")


def prune_checkpoints(output_dir: str | Path, limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that one more fits under ``limit``; returns the removed dirs."""
    if limit is None:
        return []
    ckpts = list_checkpoints(output_dir)
    excess = len(ckpts) + 1 - limit
    removed = ckpts[:max(excess, 0)]
    for d in removed:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", d, limit)
        shutil.rmtree(d)
    return removed


# --------------------------------------------------------------------------- guard state

def _split_state(state: Any, prefix: str, tensors: dict, rest: Any):
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {k: _split_state(v, f"{prefix}.{k}", tensors, rest) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_split_state(v, f"{prefix}.{i}", tensors, rest) for i, v in enumerate(state)]
    return state


def _join_state(obj: Any, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def save_guard_state(objects: dict[str, Any], directory: str | Path, rank: int) -> None:
    """Write ``{name: obj.state_dict()}`` as safetensors + json for this process."""
    from safetensors.torch import save_file

    if not objects:
        return
    tensors: dict[str, torch.Tensor] = {}
    meta = {name: _split_state(obj.state_dict(), name, tensors, None) for name, obj in objects.items()}
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / f"guard_state_{rank}.safetensors"))
    (d / f"guard_state_{rank}.json").write_text(json.dumps(meta))


def load_guard_state(objects: dict[str, Any], directory: str | Path, rank: int) -> None:
    from safetensors.torch import load_file

    if not objects:
        return
    d = Path(directory)
    jpath = d / f"guard_state_{rank}.json"
    if not jpath.is_file():
        raise CheckpointError(f"checkpoint {str(d)!r} has no {jpath.name} (saved with another guard or "
                              "process count?)")
    tensors = load_file(str(d / f"guard_state_{rank}.safetensors"))
    meta = json.loads(jpath.read_text())
    for name, obj in objects.items():
        if name not in meta:
            raise CheckpointError(f"checkpoint {str(d)!r} holds no state for guard component {name!r}")
        obj.load_state_dict(_join_state(meta[name], tensors))


# --------------------------------------------------------------------------- LoRA

def lora_state_dicts(unet, text_encoder=None) -> tuple[dict, dict | None]:
    """(unet, text_encoder) LoRA weights in diffusers format (fp32, cpu)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def grab(model):
        sd = get_peft_model_state_dict(model)
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    unet_sd = convert_state_dict_to_diffusers(grab(unet))
    te_sd = convert_state_dict_to_diffusers(grab(text_encoder)) if text_encoder is not None else None
    return unet_sd, te_sd


def kohya_state_dict(unet, text_encoder=None, lora_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A1111/ComfyUI (kohya) keys: ``lora_unet_*.lora_down/lora_up.weight`` + ``*.alpha``."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_sd = {f"unet.{k}": v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(unet).items()}
    if text_encoder is not None:
        peft_sd.update({f"text_encoder.{k}": v.detach().to("cpu", torch.float32)
                        for k, v in get_peft_model_state_dict(text_encoder).items()})
    kohya = convert_state_dict_to_kohya(peft_sd)
    out = {}
    for k, v in kohya.items():
        k = k.replace("lora_te1_", "lora_te_")  # SD1.x/2.x have one text encoder: A1111 expects lora_te_
        if k.endswith(".alpha") and lora_alpha is not None:
            v = torch.tensor(float(lora_alpha))
        out[k] = v.contiguous()
    return out


def save_lora(output_dir: str | Path, unet, text_encoder=None, kohya: bool = True) -> dict[str, Path]:
    """Write the diffusers LoRA file (+ kohya copy); returns the paths written."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    unet_sd, te_sd = lora_state_dicts(unet, text_encoder)
    unet_meta = unet.peft_config["default"].to_dict()
    te_meta = text_encoder.peft_config["default"].to_dict() if text_encoder is not None else None
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(output_dir), unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
        safe_serialization=True, unet_lora_adapter_metadata=unet_meta,
        text_encoder_lora_adapter_metadata=te_meta)
    written = {"diffusers": output_dir / LORA_WEIGHT_NAME}
    if kohya:
        alpha = unet_meta.get("lora_alpha")
        rank = unet_meta.get("r")
        save_file(kohya_state_dict(unet, text_encoder, alpha), str(output_dir / KOHYA_WEIGHT_NAME),
                  metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                            "ss_network_alpha": str(alpha), "format": "pt"})
        written["kohya"] = output_dir / KOHYA_WEIGHT_NAME
    return written


def load_lora_into(input_dir: str | Path, unet, text_encoder=None) -> None:
    """Load a checkpoint's diffusers LoRA file back into peft-adapted models (exact copy)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    lora_sd, _ = StableDiffusionPipeline.lora_state_dict(str(input_dir))
    unet_sd = {k[len("unet."):]: v for k, v in lora_sd.items() if k.startswith("unet.")}
    unet_sd = convert_unet_state_dict_to_peft(unet_sd)
    result = set_peft_model_state_dict(unet, unet_sd, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise CheckpointError(f"checkpoint {str(input_dir)!r}: unexpected LoRA keys {unexpected[:5]}")
    if text_encoder is not None:
        _set_state_dict_into_text_encoder(lora_sd, prefix="text_encoder.", text_encoder=text_encoder)


# --------------------------------------------------------------------------- hooks

def register_hooks(accelerator, mode: str, unet, text_encoder=None, ema=None,
                   guard_objects: dict[str, Any] | None = None) -> None:
    """Save/load hooks for ``accelerator.save_state``/``load_state``.

    ``unet``/``text_encoder``: the unwrapped trainable models (text_encoder only when trained).
    """
    guard_objects = guard_objects or {}

    def _which(model):
        m = accelerator.unwrap_model(model)
        if m is unet:
            return "unet"
        if text_encoder is not None and m is text_encoder:
            return "text_encoder"
        return None

    def save_hook(models, weights, output_dir):
        handled = [i for i, m in enumerate(models) if _which(m) is not None]
        if accelerator.is_main_process:
            if mode == "lora":
                save_lora(output_dir, unet, text_encoder, kohya=False)
            else:
                unet.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
                if text_encoder is not None:
                    text_encoder.save_pretrained(os.path.join(output_dir, "text_encoder"), safe_serialization=True)
                if ema is not None:
                    ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
        for i in sorted(handled, reverse=True):
            if i < len(weights):
                weights.pop(i)
        save_guard_state(guard_objects, output_dir, accelerator.process_index)

    def load_hook(models, input_dir):
        for i in sorted((i for i, m in enumerate(models) if _which(m) is not None), reverse=True):
            models.pop(i)
        if mode == "lora":
            load_lora_into(input_dir, unet, text_encoder)
        else:
            from diffusers import UNet2DConditionModel
            from diffusers.training_utils import EMAModel

            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            unet.register_to_config(**loaded.config)
            unet.load_state_dict(loaded.state_dict())
            del loaded
            if text_encoder is not None:
                from transformers import CLIPTextModel

                text_encoder.load_state_dict(CLIPTextModel.from_pretrained(input_dir, subfolder="text_encoder").state_dict())
            if ema is not None:
                loaded_ema = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DConditionModel)
                ema.load_state_dict(loaded_ema.state_dict())
                ema.to(accelerator.device)
                del loaded_ema
        load_guard_state(guard_objects, input_dir, accelerator.process_index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --------------------------------------------------------------------------- full pipeline

def save_full_pipeline(output_dir: str | Path, model: str, unet, text_encoder, vae, tokenizer,
                       revision: str | None = None, variant: str | None = None) -> Path:
    """A diffusers StableDiffusionPipeline dir (safetensors) with the trained UNet."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model, unet=unet, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, revision=revision, variant=variant)
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    return Path(output_dir)
