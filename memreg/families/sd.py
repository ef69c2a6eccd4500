"""SD 1.x and SD 2.x: one CLIP text encoder, a UNet conditioned on its last hidden states only.

SD 2.x differs in its text encoder (OpenCLIP-H, 1024-d) and, for 2.x at 768 px, v-prediction;
the paper's SD2.x score weights (g1 1, g2 0.1) were measured on the v-prediction model, so an
epsilon-prediction SD 2.x (2.x-base) keeps the SD1.x weights (g1 1, g2 2), the rule memreg used
before the family seam (``memreg.score.default_preset``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTextModel

from memreg.encoding import PromptEncoder
from memreg.families.base import Components, ModelFamily, load_parts

SD_CLASS_NAMES = ("StableDiffusionPipeline",)
SD2_TEXT_WIDTH = 1024   # OpenCLIP ViT-H/14's hidden size, SD 2.x's cross-attention width


class StableDiffusionFamily(ModelFamily):
    """What SD 1.x and 2.x share; :class:`SD1Family` / :class:`SD2Family` differ in detection and preset."""

    pipeline_class_names = SD_CLASS_NAMES
    subfolders = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    weight_subfolders = ("unet", "vae", "text_encoder")

    def load(self, model: str, *, revision=None, variant=None, dtype=torch.float32, device="cpu",
             with_vae: bool = True, vae_model: str | None = None) -> Components:
        parts = load_parts(model, [("tokenizer", "text_encoder", CLIPTextModel)], revision=revision, variant=variant,
                           dtype=dtype, device=device, with_vae=with_vae, vae_model=vae_model)
        return Components(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"], parts["scheduler"],
                          model, family=self, vae_scale_factor=parts["vae_scale_factor"])

    def prompt_encoder(self, components: Components, device=None, image_size: int | None = None) -> PromptEncoder:
        return PromptEncoder(components.tokenizer, components.text_encoder, device=device)

    def build_pipeline(self, components: Components, unet=None, scheduler=None):
        if components.vae is None:
            raise ValueError("image generation needs the VAE; load the components with with_vae=True")
        pipe = StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
            unet=unet if unet is not None else components.unet,
            scheduler=scheduler if scheduler is not None else DDIMScheduler.from_config(components.scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_pipeline_prompts(self, pipe, prompts: Sequence[str], height: int | None = None,
                                width: int | None = None):
        return pipe.encode_prompt(list(prompts), pipe.device, 1, True)

    def pipeline_kwargs(self, cond, uncond) -> dict:
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}

    def pipeline_class(self):
        return StableDiffusionPipeline

    def pipeline_parts(self, components: Components) -> dict:
        return {"unet": components.unet, "text_encoder": components.text_encoder, "vae": components.vae,
                "tokenizer": components.tokenizer, "safety_checker": None, "feature_extractor": None,
                "requires_safety_checker": False}

    def kohya_key(self, key: str, unet_config=None) -> str:
        return key.replace("lora_te1_", "lora_te_")  # one text encoder: A1111 expects lora_te_


def is_sd2_config(unet_config: dict, scheduler_config: dict) -> bool:
    """An SD 2.x UNet: 1024-d cross-attention (OpenCLIP-H), or v-prediction."""
    return (unet_config.get("cross_attention_dim") == SD2_TEXT_WIDTH
            or scheduler_config.get("prediction_type") == "v_prediction")


class SD1Family(StableDiffusionFamily):
    name = "sd1"
    label = "SD 1.x"

    def matches(self, class_name, unet_config, scheduler_config) -> bool:
        return (class_name in (None, *SD_CLASS_NAMES) and unet_config.get("addition_embed_type") is None
                and not is_sd2_config(unet_config, scheduler_config))


class SD2Family(StableDiffusionFamily):
    name = "sd2"
    label = "SD 2.x"

    def matches(self, class_name, unet_config, scheduler_config) -> bool:
        return (class_name in (None, *SD_CLASS_NAMES) and unet_config.get("addition_embed_type") is None
                and is_sd2_config(unet_config, scheduler_config))

    def default_preset(self, prediction_type: str | None) -> str:
        return "sd2" if prediction_type == "v_prediction" else "sd1"
