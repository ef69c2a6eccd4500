"""memreg/demo/vae.py: VAE training reduces reconstruction error and sets the latent scale."""

import numpy as np
import torch
from PIL import Image

from memreg.demo.vae import images_to_tensor, train_vae


def test_images_to_tensor_by_hand():
    img = Image.fromarray(np.array([[[0, 255, 127]]], dtype=np.uint8))
    t = images_to_tensor([img])
    assert t.shape == (1, 3, 1, 1)
    torch.testing.assert_close(t.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


def test_training_improves_reconstruction_and_scales_latents():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(16,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=8)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(np.full((8, 8, 3), rng.integers(0, 255, 3), dtype=np.uint8)) for _ in range(16)]
    before = train_vae(vae, images, steps=1)["vae_psnr_db"]
    stats = train_vae(vae, images, steps=60, lr=3e-3)
    assert stats["vae_psnr_db"] > before + 3
    with torch.no_grad():
        lat = vae.encode(images_to_tensor(images)).latent_dist.mode()
    # scaling = 1 / std of the latents of a sample of the training images (here: all 16)
    assert abs(vae.config.scaling_factor * float(lat.std()) - 1.0) < 1e-4
