"""Train the tiny pipeline's VAE on the demo images, so generations decode to meaningful pixels.

A randomly initialised AutoencoderKL maps latents to noise-like images; real SD ships a trained VAE.
The demo's VAE halves the image side (``base.vae_downsample``: 8 x 8 latents of 4 channels for the
16-px images, 3x fewer numbers than pixels), so a short reconstruction run (MSE + a small KL term, as
in SD's VAE objective without the perceptual/GAN parts) keeps every photo well above the copy
detector's threshold. It is trained once, then frozen like a real SD VAE.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_vae(vae, images: list[Image.Image], steps: int = 400, batch_size: int = 64, lr: float = 2e-3,
              kl_weight: float = 1e-6, seed: int = 0) -> dict:
    """Fit ``vae`` in place to reconstruct ``images``; returns the final reconstruction PSNR (dB)."""
    data = images_to_tensor(images)
    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x = data[torch.randint(len(data), (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        loss = torch.nn.functional.mse_loss(rec, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = data[torch.randperm(len(data), generator=gen)[:512]]
        latents = vae.encode(x).latent_dist.mode()
        rec = vae.decode(latents).sample.clamp(-1, 1)
        mse = torch.nn.functional.mse_loss(rec, x).item()
    # As for SD's VAE: scale latents to unit variance so the diffusion noise schedule fits them.
    scaling = 1.0 / float(latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return {"vae_psnr_db": float(10 * np.log10(4.0 / max(mse, 1e-12))), "vae_steps": steps,
            "vae_scaling_factor": scaling}
