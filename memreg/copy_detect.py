"""Copy detectors: is a generated image a copy of a training image?

Two detectors share one interface (:class:`CopyDetector`): ``embed(images)`` turns PIL images into
features once (training images are embedded once and cached by the monitor), ``similarity(q, r)``
gives the (Q, R) similarity matrix, ``nearest(q, r)`` the best match of each query, and
``threshold`` the similarity above which a generation counts as memorized. ``build_copy_detector``
picks one by name; ``register_copy_detector`` plugs in another.

``ssim`` (default, no weights)
    SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, data range 1) on RGB
    images center-cropped to a square and resized (PIL bicubic, antialiased) to ``resolution`` px
    (32 by default), averaged over channels and positions, maximized over integer translations of
    the generation by up to ``max_shift`` px (2 by default; both images compared on their central
    ``resolution - 2 * max_shift`` square). Plain SSIM collapses under a 1-2 px shift on textured
    images (a first calibration at 64 px without the shift search: copies shifted by 2 px scored
    down to -0.2 and only 82 % of the copies cleared the 0.5 %-FPR threshold); the search fixes that
    at 25x the cost. It is written in torch (separable Gaussian filtering as two banded matrix
    products) rather than calling ``skimage.metrics.structural_similarity`` because the copy check
    compares every generation with *every* training image under every shift: batched tensor ops on
    the eval device do those pairs in one pass, where skimage would be a Python loop per pair and
    shift on the CPU. With ``max_shift=0`` it equals skimage's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1, channel_axis=-1)`` (tested). A pixel metric fits small images (the tiny pipeline's
    32 px) and low-level copies; it misses semantic re-compositions, which is what SSCD is for. Its
    weakness: two different images that are both mostly flat with similar colours (the shape scenes
    below) score up to ~0.73.

``sscd`` (a TorchScript file the user supplies; never downloaded)
    The SSCD copy-detection descriptor (Pizzi et al. 2022), e.g. ``sscd_disc_mixup.torchscript.pt``,
    loaded with ``torch.jit.load(path, map_location="cpu")``. Preprocessing as the SSCD README's
    ``small_288``: resize the small edge to 288 px (bilinear, antialiased), ToTensor, ImageNet
    mean/std; descriptors are L2-normalized and compared by cosine similarity. Default threshold
    0.5 (SSCD's "copy" operating point used by Somepalli et al. 2023 and the memorization literature).

SSIM threshold calibration: ``.venv/bin/python scripts/calibrate_copy_detector.py`` (defaults:
``--resolution 32 --max-shift 2 --gen-resolutions 32 64 --scenes 40 --seed 0``; about a minute on 2
CPU cores). Known copies are bundled scikit-image photos and procedural shape scenes after
generator-like degradations applied at 32 and 64 px (Gaussian noise sigma 0.02/0.05, blur radius
0.5/1 px, JPEG quality 75/30, shifts of 1-2 px, and a blur+shift+noise+JPEG combination); known
non-copies are pairs of different images from the same pool (clean vs clean, and a noisy or
combo-degraded image vs every other clean one). Its output::

    SSIM detector at 32 px, max shift 2 px; 62 base images (22 skimage photos, 40 shape scenes); degradations at [32, 64] px

    known copies (degraded vs original):
      noise.02               n=  124  min=0.706 p1=0.743 p5=0.800 p50=0.962 p95=0.995 p99=0.999 max=1.000
      noise.05               n=  124  min=0.293 p1=0.373 p5=0.479 p50=0.839 p95=0.973 p99=0.994 max=0.999
      blur0.5                n=  124  min=0.914 p1=0.921 p5=0.967 p50=0.995 p95=0.999 p99=1.000 max=1.000
      blur1                  n=  124  min=0.480 p1=0.537 p5=0.734 p50=0.954 p95=0.991 p99=0.996 max=0.998
      jpeg75                 n=  124  min=0.465 p1=0.545 p5=0.655 p50=0.921 p95=0.996 p99=0.999 max=1.000
      jpeg30                 n=  124  min=0.381 p1=0.401 p5=0.549 p50=0.845 p95=0.987 p99=0.996 max=1.000
      shift1,0               n=  124  min=0.614 p1=0.765 p5=0.884 p50=0.996 p95=1.000 p99=1.000 max=1.000
      shift0,2               n=  124  min=1.000 p1=1.000 p5=1.000 p50=1.000 p95=1.000 p99=1.000 max=1.000
      shift2,-1              n=  124  min=0.727 p1=0.756 p5=0.872 p50=0.997 p95=1.000 p99=1.000 max=1.000
      combo                  n=  124  min=0.416 p1=0.464 p5=0.580 p50=0.791 p95=0.910 p99=0.934 max=0.960
      ALL copies             n= 1240  min=0.293 p1=0.470 p5=0.621 p50=0.956 p95=1.000 p99=1.000 max=1.000
    known non-copies (different images):
      ALL non-copies         n=18910  min=-0.079 p1=0.007 p5=0.028 p50=0.117 p95=0.318 p99=0.443 max=0.729
      hardest non-copy pairs: scene00~scene35 0.729, scene00~scene35 0.729, scene04~scene21 0.729, scene04~scene21 0.728, scene29~scene35 0.669
    chosen                   threshold=0.500: copies detected 98.5%, non-copies flagged 0.47%
    default SSIM_THRESHOLD   threshold=0.500: copies detected 98.5%, non-copies flagged 0.47%
    rule: distributions overlap (0.729 > 0.293); 99.5th percentile of non-copies (0.494) rounded up to 0.05

So ``SSIM_THRESHOLD = 0.5``: the 99.5th percentile of the non-copies, rounded up to 0.05; at that
threshold 98.5 % of the degraded copies are detected and 0.47 % of the non-copy pairs flagged.
The misses (1.5 %) come from the strongest degradations (noise sigma 0.05, JPEG, 1 px blur, the
combination). A different ``resolution``/``max_shift`` needs its own calibration run.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from memreg.errors import MemregError
from memreg.image_io import to_rgb

SSIM_THRESHOLD = 0.5          # calibrated at resolution 32, max_shift 2; see the module docstring
SSCD_THRESHOLD = 0.5
SSCD_SMALL_EDGE = 288
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CopyDetectorError(MemregError, ValueError):
    """A copy detector that cannot be built (unknown name, missing or unreadable weights file)."""


def center_square(image: Image.Image) -> Image.Image:
    """The largest centered square crop of ``image``."""
    w, h = image.size
    if w == h:
        return image
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def to_rgb_tensor(images: Sequence[Image.Image], size: int) -> Tensor:
    """(N, 3, size, size) uint8: each image center-cropped to a square, resized (bicubic), RGB."""
    arrs = []
    for im in images:
        im = center_square(to_rgb(im))
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.uint8))
    if not arrs:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> Tensor:
    """Normalized 1-D Gaussian taps, radius ``int(truncate * sigma + 0.5)`` (11 taps for sigma 1.5)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).float()


def filter_matrix(size: int, sigma: float = 1.5, device=None) -> Tensor:
    """(size - k + 1, size) banded matrix M with ``M @ x`` = 'valid' 1-D Gaussian filtering of x."""
    win = gaussian_window(sigma)
    k = win.numel()
    if size < k:
        raise ValueError(f"images of {size} px are smaller than the {k}-px SSIM window")
    m = torch.zeros(size - k + 1, size)
    for i in range(size - k + 1):
        m[i, i:i + k] = win
    return m.to(device)


def _filter(x: Tensor, mh: Tensor, mw: Tensor) -> Tensor:
    """Separable 'valid' Gaussian filtering over the last two axes: ``mh @ x @ mw.T``."""
    return mh @ x @ mw.T


def ssim_pairs(x: Tensor, y: Tensor, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean SSIM of each pair (x[i], y[i]) of (..., C, H, W) float images in [0, 1], over C, H, W.

    ``x`` and ``y`` broadcast against each other; returns float32 of the broadcast batch shape.
    """
    x, y = torch.broadcast_tensors(x.float(), y.float())
    mh = filter_matrix(x.shape[-2], sigma, x.device)
    mw = filter_matrix(x.shape[-1], sigma, x.device)
    return _ssim_from_stats(x, y, _filter(x, mh, mw), _filter(y, mh, mw), _filter(x * x, mh, mw),
                            _filter(y * y, mh, mw), _filter(x * y, mh, mw), k1, k2)


def _ssim_from_stats(x, y, mx, my, exx, eyy, exy, k1=0.01, k2=0.03) -> Tensor:
    c1, c2 = k1 ** 2, k2 ** 2
    sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).flatten(-3).mean(dim=-1)


class CopyDetector(Protocol):
    name: str
    threshold: float

    def embed(self, images: Sequence[Image.Image]) -> Tensor: ...

    def similarity(self, queries: Tensor, refs: Tensor) -> Tensor: ...


class _Base:
    name = "base"
    threshold = 0.5
    ref_chunk = 256

    def nearest(self, queries: Tensor, refs: Tensor) -> tuple[Tensor, Tensor]:
        """(max similarity, index of the nearest reference) of each query; (Q,) each."""
        if refs.shape[0] == 0:
            raise ValueError("no reference images to compare with")
        sim = self.similarity(queries, refs)
        best, idx = sim.max(dim=1)
        return best, idx

    def compare(self, a: Sequence[Image.Image], b: Sequence[Image.Image]) -> Tensor:
        """Similarity of each pair (a[i], b[i]); (N,) float32."""
        if len(a) != len(b):
            raise ValueError(f"compare() needs as many images in a ({len(a)}) as in b ({len(b)})")
        fa, fb = self.embed(a), self.embed(b)
        return torch.stack([self.similarity(fa[i:i + 1], fb[i:i + 1])[0, 0] for i in range(len(a))]) \
            if len(a) else torch.zeros(0)

    def is_copy(self, similarity: Tensor) -> Tensor:
        return similarity > self.threshold


class SSIMDetector(_Base):
    """Shift-tolerant pixel-space SSIM at a fixed resolution; features are (N, 3, R, R) uint8 (CPU).

    The similarity of a query and a reference is the largest SSIM over integer translations of the
    query by up to ``max_shift`` px (both compared on the central ``R - 2 * max_shift`` square), so
    a generation offset by a pixel or two from its training image still scores as a copy.
    """

    name = "ssim"

    def __init__(self, resolution: int = 32, threshold: float | None = None, device=None,
                 max_shift: int = 2, sigma: float = 1.5, ref_chunk: int = 64):
        self.resolution = int(resolution)
        self.max_shift = int(max_shift)
        self.threshold = SSIM_THRESHOLD if threshold is None else float(threshold)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.sigma = sigma
        self.ref_chunk = ref_chunk
        if self.max_shift < 0:
            raise CopyDetectorError(f"max_shift must be >= 0, got {max_shift}")
        inner = self.resolution - 2 * self.max_shift
        if inner < gaussian_window(sigma).numel():
            raise CopyDetectorError(f"ssim resolution {self.resolution} (minus 2 x max_shift) is smaller "
                                    "than the 11-px SSIM window")

    def embed(self, images: Sequence[Image.Image]) -> Tensor:
        return to_rgb_tensor(images, self.resolution)

    @torch.no_grad()
    def similarity(self, queries: Tensor, refs: Tensor) -> Tensor:
        s, r = self.max_shift, self.resolution
        inner = r - 2 * s
        mh = filter_matrix(inner, self.sigma, self.device)
        filt = lambda t: _filter(t, mh, mh)  # noqa: E731
        shifts = [(dy, dx) for dy in range(2 * s + 1) for dx in range(2 * s + 1)]
        out = torch.empty(queries.shape[0], refs.shape[0], dtype=torch.float32)
        for j in range(0, refs.shape[0], self.ref_chunk):
            ref = refs[j:j + self.ref_chunk, :, s:s + inner, s:s + inner].to(self.device).float() / 255.0
            my, eyy = filt(ref), filt(ref * ref)                                   # (n, 3, h, w)
            for i in range(queries.shape[0]):
                q = queries[i].to(self.device).float() / 255.0
                win = torch.stack([q[:, dy:dy + inner, dx:dx + inner] for dy, dx in shifts])  # (S, 3, .., ..)
                mx, exx = filt(win)[:, None], filt(win * win)[:, None]            # (S, 1, 3, h, w)
                exy = filt(win[:, None] * ref[None])                                # (S, n, 3, h, w)
                ssim = _ssim_from_stats(None, None, mx, my[None], exx, eyy[None], exy)  # (S, n)
                out[i, j:j + ref.shape[0]] = ssim.max(dim=0).values.cpu()
        return out


class SSCDDetector(_Base):
    """SSCD descriptors from a user-supplied TorchScript file; cosine similarity."""

    name = "sscd"

    def __init__(self, path: str | Path, threshold: float | None = None, device=None,
                 small_edge: int = SSCD_SMALL_EDGE, batch_size: int = 16):
        path = Path(path)
        if not path.is_file():
            raise CopyDetectorError(f"sscd_path {str(path)!r} does not exist (SSCD weights are never downloaded; "
                                    "pass the TorchScript file, e.g. sscd_disc_mixup.torchscript.pt)")
        try:
            with warnings.catch_warnings():  # torch 2.x deprecates TorchScript; SSCD ships as TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise CopyDetectorError(f"sscd_path {str(path)!r} is not a loadable TorchScript file ({e})") from None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.path = str(path)
        self.threshold = SSCD_THRESHOLD if threshold is None else float(threshold)
        self.small_edge = int(small_edge)
        self.batch_size = batch_size

    def preprocess(self, image: Image.Image) -> Tensor:
        """(3, H, W) float: small edge resized to ``small_edge`` (bilinear, antialiased), ImageNet-normalized."""
        im = to_rgb(image)
        w, h = im.size
        s = self.small_edge / min(w, h)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        if size != (w, h):
            im = im.resize(size, Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> Tensor:
        """(N, D) float32 L2-normalized descriptors on the CPU (images batched by preprocessed size)."""
        tensors = [self.preprocess(im) for im in images]
        out: list[Tensor | None] = [None] * len(tensors)
        by_shape: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        for idx in by_shape.values():
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                desc = self.model(torch.stack([tensors[i] for i in chunk]).to(self.device))
                if isinstance(desc, (tuple, list)):
                    desc = desc[0]
                if desc.ndim != 2 or desc.shape[0] != len(chunk):
                    raise CopyDetectorError(f"SSCD model {self.path!r} returned shape {tuple(desc.shape)}; "
                                            f"expected ({len(chunk)}, D) descriptors")
                desc = F.normalize(desc.float(), dim=1).cpu()
                for i, d in zip(chunk, desc):
                    out[i] = d
        if not tensors:
            return torch.zeros(0, 0)
        return torch.stack(out)  # type: ignore[arg-type]

    @torch.no_grad()
    def similarity(self, queries: Tensor, refs: Tensor) -> Tensor:
        return queries.float() @ refs.float().T


_REGISTRY: dict[str, Callable[..., _Base]] = {}


def register_copy_detector(name: str, factory: Callable[..., _Base]) -> None:
    """Make ``build_copy_detector(name, ...)`` call ``factory(threshold=..., device=..., **kwargs)``."""
    _REGISTRY[name] = factory


def _ssim_factory(threshold=None, device=None, resolution: int = 32, max_shift: int = 2, **_):
    return SSIMDetector(resolution=resolution, threshold=threshold, device=device, max_shift=max_shift)


def _sscd_factory(threshold=None, device=None, sscd_path=None, **_):
    if not sscd_path:
        raise CopyDetectorError("copy_detector 'sscd' needs sscd_path (a TorchScript file)")
    return SSCDDetector(sscd_path, threshold=threshold, device=device)


register_copy_detector("ssim", _ssim_factory)
register_copy_detector("sscd", _sscd_factory)


def available_copy_detectors() -> list[str]:
    return sorted(_REGISTRY)


def build_copy_detector(name: str = "ssim", threshold: float | None = None, device=None, **kwargs) -> _Base:
    """A copy detector by name ("ssim", "sscd" or a registered one); ``threshold=None`` keeps its default."""
    if name not in _REGISTRY:
        raise CopyDetectorError(f"unknown copy_detector {name!r}; choose one of {sorted(_REGISTRY)}")
    if threshold is not None and not math.isfinite(threshold):
        raise CopyDetectorError(f"copy_threshold must be finite, got {threshold!r}")
    return _REGISTRY[name](threshold=threshold, device=device, **kwargs)


def detector_from_config(cfg, device=None) -> _Base:
    """The detector an :class:`memreg.monitor_config.EvalConfig` asks for."""
    return build_copy_detector(cfg.copy_detector, threshold=cfg.copy_threshold, device=device,
                               resolution=cfg.copy_resolution, max_shift=cfg.copy_max_shift,
                               sscd_path=cfg.sscd_path)
