"""The demo's end-of-run measurements for one fine-tuned model.

* copy rate: generations for each duplicated caption whose similarity to that caption's own
  training photo exceeds the calibrated copy detector's threshold (``memreg.copy_detect``), on the
  exact caption (in the web world: each training wording in turn) and on its paraphrases (a word
  dropped, shapes reordered, a synonym; in the web world: wordings no training row carries), each
  with its 95% Wilson interval; for held-out captions (no own photo), generations whose nearest
  duplicated photo exceeds it.
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
from scipy.stats import binomtest

from memreg.demo.adherence import mean_adherence
from memreg.demo.vae import images_to_tensor
from memreg.families import denoise, prompt_encoder
from memreg.generation import generate_images


@torch.no_grad()
def heldout_denoising_loss(components, unet, images: list[Image.Image], captions: list[str], draws: int = 4,
                           seed: int = 0, batch_size: int = 64) -> float:
    """Mean diffusion MSE (eps or v target, as the model predicts) over ``draws`` fixed (t, noise) per
    image, conditioned as the family conditions ``unet`` on each caption (``memreg.families``; SDXL's
    time ids for the images' size)."""
    vae, sched = components.vae, components.scheduler
    device = next(unet.parameters()).device
    encoder = prompt_encoder(components, device=device, image_size=images[0].height if images else None)
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
            pred = denoise(unet, noisy.to(unet.dtype), t, emb.to(unet.dtype)).sample
            total += torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="sum").item()
            count += target.numel()
    return total / count


def rate(hits) -> dict:
    """A proportion with its 95% Wilson interval (scipy's ``binomtest``)."""
    hits = np.asarray(hits, dtype=bool)
    k, n = int(hits.sum()), int(hits.size)
    ci = binomtest(k, n).proportion_ci(method="wilson") if n else None
    return {"rate": k / n if n else float("nan"), "k": k, "n": n,
            "ci95": [float(ci.low), float(ci.high)] if ci is not None else [float("nan")] * 2}


def training_wordings(entry: dict) -> list[str]:
    """The wordings a memorized photo was trained with: ``train_wordings`` (web world), else its caption."""
    return list(entry.get("train_wordings") or [entry["caption"]])


@dataclass
class FinalEvalSettings:
    images_per_caption: int = 16      # generations per duplicated caption (exact wording)
    images_per_paraphrase: int = 8    # generations per paraphrase variant of each duplicated caption
    heldout_captions: int = 128
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    loss_draws: int = 4
    heldout_vs_train: bool = True     # also the share of held-out generations that copy ANY training image (SSIM
                                      # against every distinct training image: about 17 s a run on 1 thread)
    base_images_per_heldout: int = 2  # the world check: the base model's generations per held-out caption
    seed: int = 0


def _copy_hits(components, unet, detector, prompts: list[str], refs, owner: list[int], seed0: int,
               s: FinalEvalSettings):
    """Generate one image per prompt; a hit where its similarity to its own photo exceeds the threshold."""
    imgs = generate_images(components, prompts, [seed0 + i for i in range(len(prompts))], unet=unet,
                           num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                           batch_size=64)
    sim = detector.similarity(detector.embed(imgs), refs)
    own = np.array([float(sim[i, owner[i]]) for i in range(len(imgs))])
    return imgs, own, own > detector.threshold


def base_adherence(components, heldout: list[dict], s: FinalEvalSettings) -> dict:
    """How well the model of ``components`` (the base) follows the held-out captions: adherence of
    ``base_images_per_heldout`` generations for each of the first ``heldout_captions`` (seeds apart from
    the fine-tunes' held-out generations). The world check: a base that cannot follow its captions
    would make every adherence ratio of the guard meaningless."""
    held = heldout[:s.heldout_captions]
    k = s.base_images_per_heldout
    prompts = [h["caption"] for h in held for _ in range(k)]
    imgs = generate_images(components, prompts, [20_000 + s.seed + i for i in range(len(prompts))],
                           num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, batch_size=64)
    return {"adherence": mean_adherence(imgs, [h["named"] for h in held for _ in range(k)]), "n": len(imgs)}


def evaluate_model(components, unet, detector, memorized: list[dict], train_images: list[Image.Image],
                   heldout: list[dict], s: FinalEvalSettings) -> dict:
    """All end-of-run numbers for one model (``unet`` with its LoRA active).

    ``memorized``: per duplicated photo ``{"caption", "paraphrases": {variant: text}, "image"}`` and, in
    the web world, ``train_wordings`` (the exact-caption generations cycle through them);
    ``heldout``: metadata rows with ``caption``, ``named`` and ``image``.
    """
    refs = detector.embed([m["image"] for m in memorized])
    m = s.images_per_caption
    exact_prompts = [training_wordings(d)[k % len(training_wordings(d))] for d in memorized for k in range(m)]
    exact_imgs, own, exact_hits = _copy_hits(components, unet, detector, exact_prompts, refs,
                                             [i // m for i in range(len(exact_prompts))], s.seed, s)
    variants = sorted({v for d in memorized for v in d["paraphrases"]})
    para = [(d["paraphrases"][v], v, j) for j, d in enumerate(memorized) for v in variants
            for _ in range(s.images_per_paraphrase)]
    _, _, para_hits = _copy_hits(components, unet, detector, [p for p, _, _ in para], refs, [j for _, _, j in para],
                                 s.seed + 50_000, s)

    held = heldout[:s.heldout_captions]
    held_caps = [h["caption"] for h in held]
    held_imgs = generate_images(components, held_caps, [10_000 + s.seed + i for i in range(len(held))], unet=unet,
                                num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                batch_size=64)
    held_feats = detector.embed(held_imgs)
    to_photos = detector.similarity(held_feats, refs).max(dim=1).values.numpy()
    any_train = None
    if s.heldout_vs_train:
        distinct = list({im.tobytes(): im for im in train_images}.values())   # each duplicated photo once
        to_any, _ = detector.nearest(held_feats, detector.embed(distinct))
        any_train = float((to_any.numpy() > detector.threshold).mean())
    loss = heldout_denoising_loss(components, unet, [h["image"] for h in held], held_caps, draws=s.loss_draws,
                                  seed=s.seed)
    thr = detector.threshold
    return {
        "copy_exact": rate(exact_hits),
        "copy_paraphrase": rate(para_hits),
        "copy_paraphrase_by_variant": {v: rate([h for h, (_, pv, _) in zip(para_hits, para) if pv == v])
                                       for v in variants},
        "copy_exact_by_caption": {d["caption"]: rate(exact_hits[j * m:(j + 1) * m]) for j, d in enumerate(memorized)},
        "copy_paraphrase_by_caption": {d["caption"]: rate([h for h, (_, _, pj) in zip(para_hits, para) if pj == j])
                                       for j, d in enumerate(memorized)},
        "dup_own_similarity_mean": float(own.mean()),
        "heldout_copy": rate(to_photos > thr),
        "heldout_photo_similarity_mean": float(to_photos.mean()),
        "heldout_any_train_over_threshold": any_train,
        "heldout_loss": float(loss),
        "adherence": mean_adherence(held_imgs, [h["named"] for h in held]),
        "copy_threshold": float(thr),
        "_images": {"duplicated": exact_imgs[::m], "heldout": held_imgs[:16]},
    }
