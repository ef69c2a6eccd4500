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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from memreg.copy_detect import center_square
from memreg.image_io import to_rgb


@dataclass
class SearchResult:
    embeds: Tensor            # (1, L, D) the fitted prompt embedding (detached)
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


def _loss(unet, scheduler, z: Tensor, emb: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    dtype = next(unet.parameters()).dtype
    noisy = scheduler.add_noise(z, noise, t)
    pred = unet(noisy.to(dtype), t, encoder_hidden_states=emb.to(dtype).expand(z.shape[0], -1, -1)).sample
    return F.mse_loss(pred.float(), denoising_target(scheduler, z, noise, t).float())


def _pairs(z: Tensor, n_t: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    t = torch.randint(0, n_t, (z.shape[0],), generator=gen).to(z.device)
    return t, torch.randn(z.shape, generator=gen).to(z.device, z.dtype)


@torch.no_grad()
def fixed_loss(unet, scheduler, z0: Tensor, emb: Tensor, pairs: int = 16, seed: int = 0) -> float:
    """The denoising loss of ``emb`` on ``z0`` at ``pairs`` (timestep, noise) pairs fixed by ``seed``."""
    z = z0.expand(pairs, *z0.shape[1:])
    t, noise = _pairs(z, scheduler.config.num_train_timesteps, torch.Generator("cpu").manual_seed(int(seed)))
    return float(_loss(unet, scheduler, z, emb, t, noise))


def search_embedding(unet, scheduler, z0: Tensor, init: Tensor, steps: int, lr: float = 0.01,
                     fit_noises: int = 4, seed: int = 0) -> SearchResult:
    """Fit a prompt embedding to ``z0`` (see the module doc); ``init`` (1, L, D) is not modified."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    emb = init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    z = z0.expand(fit_noises, *z0.shape[1:])
    before = fixed_loss(unet, scheduler, z0, emb.detach(), seed=seed + 1)
    with torch.enable_grad():
        for _ in range(steps):
            t, noise = _pairs(z, scheduler.config.num_train_timesteps, gen)
            loss = _loss(unet, scheduler, z, emb, t, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    emb = emb.detach()
    return SearchResult(emb.to(init.dtype), before, fixed_loss(unet, scheduler, z0, emb, seed=seed + 1), steps)
