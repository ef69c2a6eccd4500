"""DDIM generation with the weights being trained, for the monitor's ground-truth copy check.

A ``StableDiffusionPipeline`` is assembled from the components in memory (no loading, no copies of
the weights; a DDIM scheduler made from the training scheduler's config) and called with one
``torch.Generator`` per image, so generations are reproducible and never touch the global RNG.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image


def build_pipeline(components, unet=None):
    """A DDIM ``StableDiffusionPipeline`` over ``components`` (``unet`` replaces ``components.unet``)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if components.vae is None:
        raise ValueError("image generation needs the VAE; load the components with with_vae=True")
    scheduler = DDIMScheduler.from_config(components.scheduler.config)
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=unet if unet is not None else components.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
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
