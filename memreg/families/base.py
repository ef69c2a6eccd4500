"""What every model family provides, and the loaded components it hands the library.

A :class:`ModelFamily` answers, for one kind of checkpoint: is this one of mine (from the
pipeline's ``model_index.json`` class name and the UNet/scheduler configs), which subfolders it
needs, how to load it, how to encode prompts into its UNet conditioning (and the empty prompt),
how to build its diffusers pipeline and encode prompts as that pipeline does, which per-sample
added conditioning a training batch gets, how its LoRA files are written, and its default score
weights. The library asks the family (``memreg.families.family_of``) and never tests a family by
name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTokenizer

from memreg.errors import MemregError, one_line

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


@dataclass
class Components:
    """A loaded checkpoint: tokenizer(s), text encoder(s), UNet, VAE (None when not loaded), the
    DDPM training scheduler, the model id, the family (a :class:`ModelFamily`; None: read from the
    UNet config by ``family_of``) and the VAE's downsampling factor."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    scheduler: Any
    model: str
    tokenizer_2: Any = None
    text_encoder_2: torch.nn.Module | None = None
    family: Any = None
    vae_scale_factor: int | None = None
    pipeline_config: dict | None = None   # the pipeline's own config (model_index.json), e.g. SDXL's force_zeros

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    def image_size(self) -> int:
        """Pixels of the UNet's default sample (its ``sample_size`` times the VAE factor)."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return int(size) * int(self.vae_scale_factor or vae_scale_of(self.vae))


def vae_scale_of(vae_or_config) -> int:
    """2 ** (VAE levels - 1), from a VAE or its config dict; 8 when unknown (every SD checkpoint)."""
    if vae_or_config is None:
        return 8
    cfg = getattr(vae_or_config, "config", vae_or_config)
    blocks = cfg["block_out_channels"] if isinstance(cfg, dict) else cfg.block_out_channels
    return 2 ** (len(blocks) - 1)


def check_subfolders(model: str, need: Sequence[str], weights: Sequence[str], what: str) -> None:
    """Fail early, naming the problem, if a local model dir lacks a component of ``need`` or the
    safetensors weights of one in ``weights``; ``what`` names the pipeline kind in the message."""
    path = Path(model)
    for sub in need:
        if not (path / sub).is_dir():
            raise ModelError(f"model dir {model!r} has no {sub}/ subfolder (not a diffusers {what} pipeline)")
        if sub in weights and not any((path / sub).glob("*.safetensors")):
            pickled = sorted(f.name for f in (path / sub).glob("*.bin"))
            cause = (f"holds only pickled weights ({', '.join(pickled)}); memreg loads safetensors only: convert the "
                     "model (diffusers: pipe.save_pretrained(dir, safe_serialization=True))" if pickled
                     else "has no .safetensors weights")
            raise ModelError(f"model dir {model!r}: {sub}/ {cause}")


def load_error(model: str, e: Exception) -> ModelError:
    return ModelError(f"model {model!r}: cannot load ({one_line(e)})")


class ModelFamily:
    """Protocol and shared defaults; one subclass per family (``memreg/families/<name>.py``),
    one instance in ``memreg.families.registry.FAMILIES``."""

    name = ""                                    # registry key, also the default score preset's name
    label = ""                                   # for messages and reports ("SD 1.x")
    pipeline_class_names: tuple[str, ...] = ()   # model_index.json ``_class_name`` values
    subfolders: tuple[str, ...] = ()             # a local dir must have these (VAE included)
    weight_subfolders: tuple[str, ...] = ()      # ... with safetensors weights in these
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    # whether the default score weights were published (and validated) for this family's real weights
    preset_validated = True
    preset_note = ""

    def matches(self, class_name: str | None, unet_config: dict, scheduler_config: dict) -> bool:
        raise NotImplementedError

    def default_preset(self, prediction_type: str | None) -> str:
        return self.name

    def load(self, model: str, *, revision=None, variant=None, dtype=torch.float32, device="cpu",
             with_vae: bool = True, vae_model: str | None = None) -> Components:
        raise NotImplementedError

    def prompt_encoder(self, components: Components, device=None, image_size: int | None = None):
        """Batched prompt -> conditioning encoder (``__call__``, ``encode``, ``uncond``, ``tokenize``,
        ``max_length``); ``image_size``: pixels of the samples it conditions (added conditioning)."""
        raise NotImplementedError

    def build_pipeline(self, components: Components, unet=None, scheduler=None):
        raise NotImplementedError

    def encode_pipeline_prompts(self, pipe, prompts: Sequence[str], height: int | None = None,
                                width: int | None = None):
        """(cond, uncond) conditioning exactly as ``pipe(prompt=prompts)`` would build it."""
        raise NotImplementedError

    def pipeline_kwargs(self, cond, uncond) -> dict:
        """``pipe(**kwargs)`` inputs for precomputed conditioning (:meth:`encode_pipeline_prompts`)."""
        raise NotImplementedError

    def training_conditioning(self, cond, batch: dict, resolution: int):
        """``cond`` with the per-sample added conditioning of a training batch (none by default)."""
        return cond

    def pipeline_class(self):
        """The family's diffusers pipeline class (its ``from_pretrained``, ``save_lora_weights`` and
        ``lora_state_dict`` read and write what users load)."""
        raise NotImplementedError

    def pipeline_parts(self, components: Components) -> dict:
        """``pipeline_class().from_pretrained(model, **parts)`` keyword arguments that put these
        components (e.g. trained ones) in place of the checkpoint's."""
        raise NotImplementedError

    def kohya_key(self, key: str, unet_config=None) -> str:
        """A key of diffusers' kohya conversion, renamed to what A1111/ComfyUI load for this family
        (``unet_config``: the trained UNet's, for families whose kohya names follow its layout)."""
        return key


def load_parts(model: str, text_encoders: Sequence[tuple[str, str, Any]], *, revision=None, variant=None,
               dtype=torch.float32, device="cpu", with_vae: bool = True, vae_model: str | None = None) -> dict:
    """Every component of a diffusers pipeline dir (or hub id), each from safetensors with
    ``from_pretrained(model, subfolder=...)``: ``text_encoders`` lists (tokenizer subfolder, encoder
    subfolder, encoder class); ``vae_model``: a VAE of its own (a dir or id holding the VAE at its
    root, diffusers' ``--pretrained_vae_model_name_or_path``). Models frozen, in eval mode, on
    ``device``. Returns the parts by subfolder name, plus ``vae_scale_factor``."""
    dtype = parse_dtype(dtype)
    kw = dict(revision=revision)
    wkw = dict(kw, variant=variant, use_safetensors=True)
    parts: dict[str, Any] = {}
    try:
        for tok_sub, te_sub, te_cls in text_encoders:
            parts[tok_sub] = CLIPTokenizer.from_pretrained(model, subfolder=tok_sub, **kw)
            parts[te_sub] = te_cls.from_pretrained(model, subfolder=te_sub, dtype=dtype, **wkw)
        parts["unet"] = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **wkw)
        if with_vae:
            where = dict(subfolder="vae") if vae_model is None else {}
            vkw = wkw if vae_model is None else dict(use_safetensors=True)
            parts["vae"] = AutoencoderKL.from_pretrained(vae_model or model, torch_dtype=dtype, **where, **vkw)
            parts["vae_scale_factor"] = vae_scale_of(parts["vae"])
        else:
            parts["vae"] = None
            try:
                parts["vae_scale_factor"] = vae_scale_of(AutoencoderKL.load_config(model, subfolder="vae", **kw))
            except OSError:
                parts["vae_scale_factor"] = None
        parts["scheduler"] = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    except OSError as e:  # hub id offline / not cached, missing weight files, bad revision or variant
        failed = vae_model if vae_model is not None and "unet" in parts and "vae" not in parts else model
        raise load_error(failed, e) from None
    for sub in ("unet", "vae", *(te for _, te, _ in text_encoders)):
        m = parts.get(sub)
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    return parts
