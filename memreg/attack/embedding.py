"""White-box embedding search: the prompt embedding under which the model denoises a target best.

The attacker holds the weights and the target image. The target's VAE latent ``z0`` is noised
at timesteps ``t`` with noise ``eps`` (``fit_noises`` fresh pairs per step, ``t`` uniform over the
training timesteps, from a generator seeded per target), and a continuous ``prompt_embeds``
(1, 77, d) -- the text encoder's output, started from a caption's or the empty prompt's -- is
fitted with Adam to the model's own training loss ``||model(z_t, t, c) - target||^2`` (``eps``, ``v``
or ``z0`` as the scheduler predicts). UNet, VAE and text encoder stay frozen and in eval mode;
only ``c`` has a gradient. A model that memorized the image has a region of embedding space that
denoises toward it from any noise, and this search lands there when a wording does not: Finding
Dori (2025) shows memorization that pruning "removed" for the training captions returning under
such small moves of the embedding. The same search runs on never-seen control images, whose
"extraction" rate is its false-positive rate.

What is fitted is the family's cross-attention states, the part of the conditioning a prompt's
tokens make (``memreg.families.embeds_of``): SD 1.x/2.x's (1, 77, d) text encoder output; SDXL's
(1, 77, d1 + d2) joined penultimate states of both encoders. SDXL's added conditioning (the pooled
``text_embeds`` and the ``time_ids``) stays fixed at the start's -- the start prompt's pooled
embedding, zeros for the empty prompt under ``force_zeros_for_empty_prompt`` -- and travels with
the fitted embedding into generation: the pooled vector is one global token the UNet adds to its
timestep embedding, not where a caption's wording lives, and fixing it keeps the search the same
per-token search on every family (and the result one that the pipeline's ``prompt_embeds`` /
``pooled_prompt_embeds`` inputs can express).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from memreg.copy_detect import center_square
from memreg.families import Cond, cat_conditioning, denoise, embeds_of, with_embeds
from memreg.image_io import to_rgb


@dataclass
class SearchResult:
    embeds: Cond              # (1, L, D) the fitted prompt embedding (detached; SDXL: a Conditioning with the
                              # start's added conditioning)
    loss_before: float        # denoising loss on the target at fixed (t, noise) pairs, at the start ...
    loss_after: float         # ... and at the fitted embedding (the same pairs)
    steps: int


def image_latent(vae, image: Image.Image, size: int) -> Tensor:
    """(1, C, h, w) scaled VAE latent (posterior mode) of ``image`` center-cropped and resized to ``size`` px."""
    im = center_square(to_rgb(image))
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    param = next(vae.parameters())
    with torch.no_grad():
        z = vae.encode(x.to(param.device, param.dtype)).latent_dist.mode()
    return z * vae.config.scaling_factor


def denoising_target(scheduler, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    return z0 if kind == "sample" else noise


def _start_losses(unet, scheduler, z: Tensor, emb: Cond, t: Tensor, noise: Tensor) -> Tensor:
    """(K,) each conditioning of ``emb`` (K rows)'s mean denoising loss; ``z``, ``t``, ``noise`` hold
    ``len(z) // K`` rows per embedding, in embedding order. Their sum gives every start exactly the
    gradient it would get alone, so one batched search equals K separate ones."""
    k = emb.shape[0]
    dtype = next(unet.parameters()).dtype
    noisy = scheduler.add_noise(z, noise, t)
    cond = emb.to(dtype).repeat_interleave(z.shape[0] // k, dim=0)
    pred = denoise(unet, noisy.to(dtype), t, cond).sample
    err = F.mse_loss(pred.float(), denoising_target(scheduler, z, noise, t).float(), reduction="none")
    return err.reshape(k, -1).mean(dim=1)


def _pairs(z0: Tensor, per_start: int, n_t: int, gens: list[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
    """``per_start`` (timestep, noise) pairs for each generator in turn, and ``z0`` repeated to match."""
    ts, noises = [], []
    for g in gens:
        ts.append(torch.randint(0, n_t, (per_start,), generator=g))
        noises.append(torch.randn((per_start, *z0.shape[1:]), generator=g))
    z = z0.expand(per_start * len(gens), *z0.shape[1:])
    return z, torch.cat(ts).to(z0.device), torch.cat(noises).to(z0.device, z0.dtype)


@torch.no_grad()
def fixed_losses(unet, scheduler, z0: Tensor, embeds: Cond, seeds: list[int], pairs: int = 16) -> list[float]:
    """Per row of the conditioning ``embeds`` (K rows), its denoising loss on ``z0`` at ``pairs``
    (timestep, noise) pairs fixed by its seed in ``seeds``."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    z, t, noise = _pairs(z0, pairs, scheduler.config.num_train_timesteps, gens)
    return _start_losses(unet, scheduler, z, embeds, t, noise).tolist()


def search_embeddings(unet, scheduler, z0: Tensor, inits: list[Cond], steps: int, lr: float = 0.01,
                      fit_noises: int = 4, seeds: list[int] | None = None) -> list[SearchResult]:
    """Fit one prompt embedding per start in ``inits`` (each one row of conditioning, not modified) to
    ``z0`` (see the module doc: its embeddings move, its added conditioning is kept), all in one
    batched UNet call a step. Start k draws its (timestep, noise) pairs from its own generator seeded
    ``seeds[k]`` and its fixed before/after pairs from ``seeds[k] + 1``; Adam is elementwise, so each
    start's trajectory is the one it would follow searched alone."""
    seeds = list(range(len(inits))) if seeds is None else list(seeds)
    if len(seeds) != len(inits):
        raise ValueError(f"search_embeddings: {len(inits)} starts but {len(seeds)} seeds")
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    start = cat_conditioning([e.detach() for e in inits])
    emb = embeds_of(start).clone().float().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    fixed = [s + 1 for s in seeds]
    before = fixed_losses(unet, scheduler, z0, with_embeds(start, emb.detach()), fixed)
    n_t = scheduler.config.num_train_timesteps
    with torch.enable_grad():
        for _ in range(steps):
            z, t, noise = _pairs(z0, fit_noises, n_t, gens)
            loss = _start_losses(unet, scheduler, z, with_embeds(start, emb), t, noise).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    emb = emb.detach()
    after = fixed_losses(unet, scheduler, z0, with_embeds(start, emb), fixed)
    return [SearchResult(with_embeds(inits[k].detach(), emb[k:k + 1].to(inits[k].dtype)), before[k], after[k], steps)
            for k in range(len(inits))]
