"""The demo's end-of-run measurements for one fine-tuned model.

* memorized fraction: generations for each duplicated caption whose similarity to that caption's
  own training photo exceeds the calibrated copy detector's threshold (``memreg.copy_detect``);
  for held-out captions (no own photo), generations whose nearest duplicated photo exceeds it.
  The held-out generations' max similarity to *any* training image is reported beside it: flat
  procedural scenes resemble one another at 16 px, so that number tells how the detector is
  calibrated on this data, not whether anything was copied;
* held-out denoising loss: the training objective on held-out images with fixed noise and
  timesteps, identical across runs;
* prompt adherence of held-out generations (``memreg.demo.adherence``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from memreg.demo.adherence import mean_adherence
from memreg.demo.data import Scene
from memreg.demo.vae import images_to_tensor
from memreg.generation import generate_images


@torch.no_grad()
def heldout_denoising_loss(components, unet, images: list[Image.Image], captions: list[str], draws: int = 4,
                           seed: int = 0, batch_size: int = 64) -> float:
    """Mean diffusion MSE (eps or v target, as the model predicts) over ``draws`` fixed (t, noise) per image."""
    from memreg.encoding import PromptEncoder

    vae, sched = components.vae, components.scheduler
    device = next(unet.parameters()).device
    encoder = PromptEncoder(components.tokenizer, components.text_encoder, device=device)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for lo in range(0, len(images), batch_size):
        x = images_to_tensor(images[lo:lo + batch_size]).to(device, vae.dtype)
        latents = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        emb = encoder.encode(captions[lo:lo + batch_size]).embeds
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
            noisy = sched.add_noise(latents, noise, t)
            target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
            pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=emb.to(unet.dtype)).sample
            total += torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="sum").item()
            count += target.numel()
    return total / count


@dataclass
class FinalEvalSettings:
    images_per_caption: int = 4       # generations per duplicated caption
    heldout_captions: int = 64
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    loss_draws: int = 4
    seed: int = 0


def evaluate_model(components, unet, detector, dup_refs: dict[str, Image.Image], train_images: list[Image.Image],
                   heldout: list[dict], s: FinalEvalSettings) -> dict:
    """All end-of-run numbers for one model (``unet`` with its LoRA active)."""
    caps = list(dup_refs)
    m = s.images_per_caption
    dup_prompts = [c for c in caps for _ in range(m)]
    dup_imgs = generate_images(components, dup_prompts, [s.seed + i for i in range(len(dup_prompts))], unet=unet,
                               num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                               batch_size=64)
    own_refs = detector.embed([dup_refs[c] for c in caps])
    own_sim = detector.similarity(detector.embed(dup_imgs), own_refs)
    own = np.array([float(own_sim[i, i // m]) for i in range(len(dup_imgs))])

    held = heldout[:s.heldout_captions]
    held_caps = [h["caption"] for h in held]
    held_imgs = generate_images(components, held_caps, [10_000 + s.seed + i for i in range(len(held))], unet=unet,
                                num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                batch_size=64)
    held_feats = detector.embed(held_imgs)
    to_photos = detector.similarity(held_feats, own_refs).max(dim=1).values.numpy()
    to_any, _ = detector.nearest(held_feats, detector.embed(train_images))
    to_any = to_any.numpy()
    scenes = [Scene(h["shape"], h["color"], h["background"], h["position"]) for h in held]
    loss = heldout_denoising_loss(components, unet, [h["image"] for h in held], held_caps, draws=s.loss_draws,
                                  seed=s.seed)
    thr = detector.threshold
    return {
        "dup_memorized_frac": float((own > thr).mean()),
        "dup_own_similarity_mean": float(own.mean()),
        "heldout_memorized_frac": float((to_photos > thr).mean()),
        "heldout_photo_similarity_mean": float(to_photos.mean()),
        "heldout_any_train_over_threshold": float((to_any > thr).mean()),
        "heldout_any_train_similarity_mean": float(to_any.mean()),
        "heldout_loss": float(loss),
        "adherence": mean_adherence(held_imgs, scenes),
        "copy_threshold": float(thr),
        "_images": {"duplicated": dup_imgs[::m], "heldout": held_imgs[:16]},
    }
