"""Load the components of a diffusion checkpoint (local diffusers dir or hub id), whatever its family.

One code path for the tiny test pipelines, ``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-2-1`` and ``stabilityai/stable-diffusion-xl-base-1.0``: the family
(``memreg.families``) is read from the checkpoint's config files, then each component is read with
``from_pretrained(model, subfolder=...)`` from safetensors weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memreg.families import Components, ModelError, ModelFamily, detect_family, parse_dtype
from memreg.families.base import DTYPES, check_subfolders
from memreg.families.sd import SD1Family

SDComponents = Components   # the name the trainer and older callers use
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"   # a LoRA output dir's weights (diffusers' file name)
REQUIRED_SUBFOLDERS = SD1Family.subfolders
WEIGHT_SUBFOLDERS = SD1Family.weight_subfolders

__all__ = ["DTYPES", "ModelError", "REQUIRED_SUBFOLDERS", "SDComponents", "WEIGHT_SUBFOLDERS", "check_model_path",
           "load_components", "parse_dtype"]


def _needed(family: ModelFamily, need: tuple[str, ...] | None) -> tuple[str, ...]:
    """The family's subfolders among ``need`` (None: all), a second text encoder/tokenizer with the first."""
    if need is None:
        return family.subfolders
    return tuple(s for s in family.subfolders if s in need or s.removesuffix("_2") in need)


def check_model_path(model: str, need: tuple[str, ...] | None = None) -> ModelFamily | None:
    """Fail early, naming the problem, if a local model dir lacks a component of its family (``need``:
    only these kinds, e.g. no VAE for scoring); returns the family (None for a hub id, which
    from_pretrained checks itself)."""
    path = Path(model)
    if not path.exists():
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise ModelError(f"model {model!r}: no such directory, and not a hub id of the form owner/name")
        return None  # a hub id: from_pretrained reports its own errors
    if not path.is_dir():
        raise ModelError(f"model {model!r} is a file; expected a diffusers pipeline directory")
    family = detect_family(model)
    check_subfolders(model, _needed(family, need), family.weight_subfolders, family.label)
    return family


def load_components(
    model: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_vae: bool = True,
    vae_model: str | None = None,
) -> Components:
    """Load tokenizer(s), text encoder(s), UNet, (VAE: ``model``'s, or ``vae_model``'s) and the DDPM
    training scheduler of ``model``, as its family loads them."""
    family = check_model_path(model, None if with_vae else tuple(s for s in REQUIRED_SUBFOLDERS if s != "vae"))
    if family is None:
        family = detect_family(model, revision)
    return family.load(model, revision=revision, variant=variant, dtype=parse_dtype(dtype), device=device,
                       with_vae=with_vae, vae_model=vae_model)
