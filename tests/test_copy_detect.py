"""Copy detectors (memreg/copy_detect.py): SSIM against scikit-image, shift tolerance, SSCD TorchScript."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from memreg.copy_detect import (SSIM_THRESHOLD, CopyDetectorError, SSCDDetector, SSIMDetector, build_copy_detector,
                                register_copy_detector, to_rgb_tensor)


def _textured(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return im.filter(ImageFilter.GaussianBlur(1.0))


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    a, b = _textured(0), _textured(1)
    b = Image.blend(a, b, 0.4)
    det = SSIMDetector(resolution=32, max_shift=0)
    got = det.similarity(det.embed([a]), det.embed([b]))[0, 0].item()
    want = structural_similarity(np.asarray(a) / 255.0, np.asarray(b) / 255.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0, channel_axis=-1)
    assert got == pytest.approx(want, abs=1e-5)


def test_identical_is_one_unrelated_is_lower():
    det = build_copy_detector("ssim")
    a, b, c = _textured(2), _textured(3), _textured(4, size=48)
    sims = det.compare([a, a, a, c], [a.copy(), b, c, c])
    assert sims[0].item() == pytest.approx(1.0, abs=1e-5)
    assert sims[3].item() == pytest.approx(1.0, abs=1e-5)
    assert sims[1].item() < SSIM_THRESHOLD and sims[2].item() < SSIM_THRESHOLD
    assert det.is_copy(sims).tolist() == [True, False, False, True]


def test_shift_tolerance_and_nearest():
    big = _textured(5, size=40)
    base = big.crop((4, 4, 36, 36))
    shifted = big.crop((5, 6, 37, 38))        # the same content moved by (1, 2) px
    exact = SSIMDetector(resolution=32, max_shift=0)
    tolerant = SSIMDetector(resolution=32, max_shift=2)
    assert exact.compare([shifted], [base])[0] < 0.5
    assert tolerant.compare([shifted], [base])[0] > 0.95
    refs = tolerant.embed([_textured(6), base, _textured(7)])
    best, idx = tolerant.nearest(tolerant.embed([shifted, _textured(6)]), refs)
    assert idx.tolist() == [1, 0]
    assert best[1].item() == pytest.approx(1.0, abs=1e-5)


def test_embed_center_crops_and_resizes():
    im = Image.new("RGB", (60, 40), (10, 20, 30))
    im.paste((200, 0, 0), (0, 0, 10, 40))      # a left strip the center crop removes
    t = to_rgb_tensor([im], 32)
    assert t.shape == (1, 3, 32, 32) and t.dtype == torch.uint8
    assert t[0, :, :, 0].tolist() == [[10] * 32, [20] * 32, [30] * 32]


class _TinyDescriptor(torch.nn.Module):
    """(N, 3, H, W) -> (N, 5): per-channel means and the input's H and W (checks the preprocessing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        hw = torch.tensor([float(x.shape[2]), float(x.shape[3])]).expand(n, 2)
        return torch.cat([x.mean(dim=(2, 3)), hw], dim=1)


@pytest.fixture
def sscd_file(tmp_path):
    path = tmp_path / "sscd_tiny.torchscript.pt"
    with warnings.catch_warnings():  # torch.jit.script is deprecated in torch 2.x; SSCD ships as TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_TinyDescriptor()).save(str(path))
    return path


def test_sscd_torchscript_loads_and_runs(sscd_file):
    det = build_copy_detector("sscd", sscd_path=str(sscd_file))
    assert isinstance(det, SSCDDetector) and det.threshold == 0.5
    wide = Image.new("RGB", (64, 32), (255, 255, 255))       # small edge 32 -> 288: 576 x 288
    other = Image.new("RGB", (40, 40), (0, 0, 0))
    d = det.embed([wide, other, wide])
    assert d.shape == (3, 5)
    assert torch.allclose(d.norm(dim=1), torch.ones(3), atol=1e-6)
    # white in ImageNet normalization is (1 - mean) / std per channel; descriptor = L2-normalized
    # [channel means, H, W] with H = 288, W = 576
    white = [(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    raw = torch.tensor(white + [288.0, 576.0])
    assert torch.allclose(d[0], raw / raw.norm(), atol=1e-5)
    sim = det.similarity(d, d)
    assert sim[0, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert sim[0, 1].item() < sim[0, 2].item()


def test_sscd_errors(tmp_path):
    with pytest.raises(CopyDetectorError, match="does not exist"):
        build_copy_detector("sscd", sscd_path=str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    with pytest.raises(CopyDetectorError, match="junk.pt"):
        build_copy_detector("sscd", sscd_path=str(junk))
    with pytest.raises(CopyDetectorError, match="sscd_path"):
        build_copy_detector("sscd")
    with pytest.raises(CopyDetectorError, match="unknown copy_detector"):
        build_copy_detector("clip")


def test_register_custom_detector():
    register_copy_detector("ssim_tight", lambda threshold=None, device=None, **kw: SSIMDetector(
        resolution=32, threshold=0.9 if threshold is None else threshold, device=device))
    det = build_copy_detector("ssim_tight")
    assert det.threshold == 0.9
    assert build_copy_detector("ssim_tight", threshold=0.7).threshold == 0.7
