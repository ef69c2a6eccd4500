"""DDIM generation with the weights being trained, for the monitor's ground-truth copy check.

The family's diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``) is
assembled from the components in memory (no loading, no copies of the weights; a DDIM scheduler
made from the training scheduler's config) and called with one ``torch.Generator`` per image, so
generations are reproducible and never touch the global RNG.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from memreg.families import family_of
from memreg.models import LORA_WEIGHT_NAME
from memreg.score import pure_noise_latents


def build_pipeline(components, unet=None):
    """The family's DDIM pipeline over ``components`` (``unet`` replaces ``components.unet``)."""
    return family_of(components).build_pipeline(components, unet)


def load_lora_fused(pipe, lora_dir: str, weight_name: str = LORA_WEIGHT_NAME):
    """Load a trained LoRA into ``pipe`` and merge it into the weights it adapts, for inference. The
    modules are plain layers again: a sampling forward is 1.65x faster than through the demo's
    adapters (README, "Where the time goes"), and the images are the same up to float rounding."""
    pipe.load_lora_weights(lora_dir, weight_name=weight_name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


@torch.no_grad()
def generate_images(components, prompts: Sequence[str], seeds: Sequence[int], unet=None,
                    num_inference_steps: int = 20, guidance_scale: float = 7.5, batch_size: int = 8,
                    height: int | None = None, width: int | None = None, pipe=None) -> list[Image.Image]:
    """One image per (prompt, seed) pair, DDIM with classifier-free guidance; PIL RGB images.

    Each image's initial latents come from a CPU ``torch.Generator`` seeded with its seed, so the
    same (prompt, seed) gives the same starting noise on any device and across calls.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    pipe = pipe if pipe is not None else build_pipeline(components, unet)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        out = pipe(prompt=chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   generator=gens, height=height, width=width, output_type="pil")
        images.extend(im.convert("RGB") for im in out.images)
    return images


def initial_latents(unet, seeds: Sequence[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Float32 starting noise (N, C, h, w), row i from a CPU ``torch.Generator`` seeded with
    ``seeds[i]``: the same noise ``generate_images`` starts from (in float32), on any device.
    ``height``/``width`` in latent pixels (default the UNet's sample size)."""
    return torch.cat([pure_noise_latents(unet, 1, torch.Generator("cpu").manual_seed(int(s)), height=height, width=width)
                      for s in seeds])


@torch.no_grad()
def generate_from_embeds(pipe, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                         seeds: Sequence[int], num_inference_steps: int = 20, guidance_scale: float = 7.5,
                         batch_size: int = 8, height: int | None = None,
                         width: int | None = None) -> list[Image.Image]:
    """``generate_images`` from precomputed (e.g. mitigated) conditioning ``prompt_embeds`` (N rows:
    (N, L, D) embeddings, or a ``memreg.families.Conditioning`` with the family's added inputs), one
    image per row; row i starts from ``initial_latents`` of ``seeds[i]``."""
    if prompt_embeds.shape[0] != len(seeds):
        raise ValueError(f"got {prompt_embeds.shape[0]} prompt embeddings but {len(seeds)} seeds")
    family = family_of(pipe.unet, pipe.scheduler)
    f = pipe.vae_scale_factor
    h, w = (height // f if height else None), (width // f if width else None)
    images: list[Image.Image] = []
    for i in range(0, len(seeds), batch_size):
        sl = slice(i, i + batch_size)
        latents = initial_latents(pipe.unet, seeds[sl], h, w).to(prompt_embeds.dtype)
        out = pipe(**family.pipeline_kwargs(prompt_embeds[sl], negative_prompt_embeds[sl]),
                   latents=latents, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   height=height, width=width, output_type="pil")
        images.extend(im.convert("RGB") for im in out.images)
    return images
