"""memreg/demo/evaluate.py: the held-out loss against a hand computation."""

import torch

from memreg.demo.evaluate import heldout_denoising_loss
from memreg.demo.vae import images_to_tensor


class _ZeroUNet(torch.nn.Module):
    """Predicts 0: the loss is then the mean square of the target (the drawn noise, for eps)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x, t, encoder_hidden_states):
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def test_loss_is_mse_of_the_fixed_noise(eps_components):
    from PIL import Image

    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (10, 10, 240))]
    got = heldout_denoising_loss(eps_components, _ZeroUNet(), images, ["a", "b"], draws=2, seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        lat = eps_components.vae.encode(images_to_tensor(images)).latent_dist.mode()
    expected = []
    for _ in range(2):
        noise = torch.randn(lat.shape, generator=gen)
        torch.randint(0, 1000, (2,), generator=gen)
        expected.append(noise.pow(2).mean())
    assert abs(got - float(torch.stack(expected).mean())) < 1e-6
