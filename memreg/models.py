"""Load the components of a Stable Diffusion checkpoint (local diffusers dir or hub id).

One code path for the tiny test pipeline, ``runwayml/stable-diffusion-v1-5`` and
``stabilityai/stable-diffusion-2-1``: each component is read with ``from_pretrained(model,
subfolder=...)`` from safetensors weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from memreg.errors import MemregError, one_line

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_SUBFOLDERS = ("unet", "vae", "text_encoder")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelError(MemregError, ValueError):
    """A checkpoint that cannot be used, with the reason in the message."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def check_model_path(model: str, need: tuple[str, ...] = REQUIRED_SUBFOLDERS) -> None:
    """Fail early, naming the problem, if a local model dir lacks a diffusers component."""
    path = Path(model)
    if not path.exists():
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise ModelError(f"model {model!r}: no such directory, and not a hub id of the form owner/name")
        return  # a hub id: from_pretrained reports its own errors
    if not path.is_dir():
        raise ModelError(f"model {model!r} is a file; expected a diffusers pipeline directory")
    for sub in need:
        if not (path / sub).is_dir():
            raise ModelError(f"model dir {model!r} has no {sub}/ subfolder (not a diffusers SD pipeline)")
        if sub in WEIGHT_SUBFOLDERS and not any((path / sub).glob("*.safetensors")):
            pickled = sorted(f.name for f in (path / sub).glob("*.bin"))
            cause = (f"holds only pickled weights ({', '.join(pickled)}); memreg loads safetensors only: convert the "
                     "model (diffusers: pipe.save_pretrained(dir, safe_serialization=True))" if pickled
                     else "has no .safetensors weights")
            raise ModelError(f"model dir {model!r}: {sub}/ {cause}")


@dataclass
class SDComponents:
    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    scheduler: Any
    model: str

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type


def load_components(
    model: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_vae: bool = True,
) -> SDComponents:
    """Load tokenizer, text encoder, UNet, (VAE) and the DDPM training scheduler of ``model``."""
    need = REQUIRED_SUBFOLDERS if with_vae else tuple(s for s in REQUIRED_SUBFOLDERS if s != "vae")
    check_model_path(model, need)
    dtype = parse_dtype(dtype)
    kw = dict(revision=revision)
    wkw = dict(kw, variant=variant, use_safetensors=True)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype, **wkw)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **wkw)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **wkw) if with_vae else None
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    except OSError as e:  # hub id offline / not cached, missing weight files, bad revision or variant
        raise ModelError(f"model {model!r}: cannot load ({one_line(e)})") from None
    for m in (text_encoder, unet, vae):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return SDComponents(tokenizer, text_encoder, unet, vae, scheduler, model)
