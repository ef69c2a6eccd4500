"""Attack fixtures: a tiny SD pipeline over-trained on one photo (a planted memorization).

Built once per session (about 35 s on 2 cores): the tiny pipeline (UNet levels 16/32) with a
one-block VAE (16 px latents at pixel resolution) fitted to the photos (so generations decode to
pixels), then its UNet trained 300 steps on a set where one photo ("coffee", caption "a photo of
a brown cup", three rows) fills half of every batch and four others appear as single rows. Two
more photos are never trained on: the control.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SIDE = 16
MEMORIZED = ("coffee", "a photo of a brown cup")
SINGLES = (("astronaut", "a photo of a woman"), ("rocket", "a rocket on a road"), ("camera", "a man with a camera"),
           ("moon", "the moon at night"))
CONTROL = (("chelsea", "a photo of a cat"), ("coins", "old coins on a table"))


def photo(name: str, side: int = SIDE) -> Image.Image:
    """A scikit-image sample photo, center-cropped square, ``side`` px, RGB."""
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    img = Image.fromarray(a[..., :3].astype(np.uint8))
    s = min(img.size)
    img = img.crop(((img.width - s) // 2, (img.height - s) // 2, (img.width - s) // 2 + s, (img.height - s) // 2 + s))
    return img.resize((side, side), Image.LANCZOS)


def write_folder(root: Path, rows, caption_column: str = "text") -> Path:
    """An imagefolder: ``rows`` of (file name, image, caption)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.jsonl").open("w") as f:
        for name, img, cap in rows:
            img.save(root / name)
            f.write(json.dumps({"file_name": name, caption_column: cap}) + "\n")
    return root


def _to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def overtrain(model_dir: Path, images, captions, memorized: int, steps: int = 300, lr: float = 2e-3,
              seed: int = 0) -> None:
    """Train the UNet of ``model_dir`` in place: half of every batch is image ``memorized``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from memreg.models import load_components

    comps = load_components(str(model_dir))
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").train()
    sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    with torch.no_grad():
        z = comps.vae.encode(_to_tensor(images)).latent_dist.mode() * comps.vae.config.scaling_factor
        ids = comps.tokenizer(list(captions) + [""], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
        emb = comps.text_encoder(ids)[0]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    others = [i for i in range(len(images)) if i != memorized]
    for _ in range(steps):
        idx = torch.tensor([memorized] * 4 + [others[int(j)] for j in torch.randint(len(others), (4,), generator=gen)])
        e = emb[idx].clone()
        e[torch.rand(len(idx), generator=gen) < 0.1] = emb[-1]
        noise = torch.randn(z[idx].shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(z[idx], noise, t), t, encoder_hidden_states=e).sample,
                                            noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.save_pretrained(model_dir / "unet", safe_serialization=True)


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """{"model", "data", "control"}: the over-trained pipeline and its two imagefolders."""
    from diffusers import AutoencoderKL

    from memreg.demo.vae import train_vae
    from memreg.testing import build_tiny_sd

    root = tmp_path_factory.mktemp("planted")
    model = build_tiny_sd(root / "model", sample_size=SIDE, vae_downsample=False, seed=0, unet_channels=(16, 32))
    train = [(f"mem_{k}.png", photo(MEMORIZED[0]), MEMORIZED[1]) for k in range(3)]
    train += [(f"{n}.png", photo(n), c) for n, c in SINGLES]
    control = [(f"{n}.png", photo(n), c) for n, c in CONTROL]
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    train_vae(vae, [r[1] for r in train + control], steps=150, batch_size=8, lr=5e-3)
    vae.save_pretrained(model / "vae", safe_serialization=True)
    uniq = train[2:]
    overtrain(model, [r[1] for r in uniq], [r[2] for r in uniq], memorized=0, steps=300, lr=3e-3)
    return {"model": model, "data": write_folder(root / "train", train),
            "control": write_folder(root / "control", control)}


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: multi-process (accelerate launch --cpu) run, < 60 s")
