"""Calibrate the SSIM copy detector's threshold on known copies vs known non-copies.

Known copies: each base image vs itself after generator-like degradations (Gaussian noise, slight
blur, JPEG quantization, 1-2 px shifts, a combination), applied at the generation resolution(s).
Known non-copies: pairs of *different* base images (clean vs clean, and clean vs a degraded other).
Base images: the photos bundled with scikit-image (no download) and procedurally drawn shape
scenes (flat backgrounds with a few coloured shapes: the hard case for SSIM, whose structure term
is 1 on flat regions).

Threshold rule: if the distributions separate, the midpoint of the gap between the largest
non-copy and the smallest copy similarity, rounded to 0.05 inside the gap; otherwise the 99.5th
percentile of the non-copies (FPR <= 0.5 %) rounded up to a multiple of 0.05. Prints the distributions, the error rates at
the chosen threshold and at the module's default ``SSIM_THRESHOLD``.

    .venv/bin/python scripts/calibrate_copy_detector.py [--resolution 32] [--max-shift 2] [--gen-resolutions 32 64]
"""

from __future__ import annotations

import argparse
import io
import math
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memreg.copy_detect import SSIM_THRESHOLD, SSIMDetector, center_square  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "horse", "page", "text",
          "clock", "brick", "grass", "gravel", "retina", "cell", "hubble_deep_field", "immunohistochemistry",
          "logo", "microaneurysms", "colorwheel", "checkerboard")


def skimage_photos() -> dict[str, Image.Image]:
    import skimage.data

    out = {}
    for name in PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception as e:  # a photo that needs a download: skip it
            print(f"  (skipping skimage.data.{name}: {type(e).__name__})")
            continue
        arr = np.asarray(arr)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            arr = (255 * (arr.astype(np.float64) - arr.min()) / max(np.ptp(arr), 1e-12)).astype(np.uint8)
        out[name] = Image.fromarray(arr).convert("RGB")
    return out


def shape_scene(rng: np.random.Generator, size: int = 256) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        r = int(rng.integers(size // 10, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        kind = rng.integers(0, 4)
        box = (cx - r, cy - r, cx + r, cy + r)
        if kind == 0:
            draw.ellipse(box, fill=color)
        elif kind == 1:
            draw.rectangle(box, fill=color)
        elif kind == 2:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        else:
            w = max(2, r // 3)
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
    arr = np.asarray(im, dtype=np.float64) + rng.normal(0, 4, (size, size, 3))  # mild texture
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def add_noise(im: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(im, dtype=np.float64) / 255 + rng.normal(0, sigma, (im.size[1], im.size[0], 3))
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8))


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def shift(im: Image.Image, dx: int, dy: int) -> Image.Image:
    """Translate by (dx, dy) px, replicating the edge into the uncovered border."""
    arr = np.asarray(im)
    h, w = arr.shape[:2]
    padded = np.pad(arr, ((abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    y0, x0 = abs(dy) - dy, abs(dx) - dx
    return Image.fromarray(padded[y0:y0 + h, x0:x0 + w])


def degradations(im: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    return {
        "noise.02": add_noise(im, 0.02, rng),
        "noise.05": add_noise(im, 0.05, rng),
        "blur0.5": im.filter(ImageFilter.GaussianBlur(0.5)),
        "blur1": im.filter(ImageFilter.GaussianBlur(1.0)),
        "jpeg75": jpeg(im, 75),
        "jpeg30": jpeg(im, 30),
        "shift1,0": shift(im, 1, 0),
        "shift0,2": shift(im, 0, 2),
        "shift2,-1": shift(im, 2, -1),
        "combo": jpeg(add_noise(shift(im.filter(ImageFilter.GaussianBlur(0.5)), 1, 1), 0.03, rng), 50),
    }


def stats(name: str, x: np.ndarray) -> str:
    q = np.percentile(x, [0, 1, 5, 50, 95, 99, 100])
    return (f"{name:<22} n={x.size:5d}  min={q[0]:.3f} p1={q[1]:.3f} p5={q[2]:.3f} p50={q[3]:.3f} "
            f"p95={q[4]:.3f} p99={q[5]:.3f} max={q[6]:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=32, help="detector resolution (px)")
    ap.add_argument("--gen-resolutions", type=int, nargs="+", default=[32, 64],
                    help="resolutions the degradations are applied at (a generator's output size)")
    ap.add_argument("--max-shift", type=int, default=2, help="translations (px) the SSIM maximizes over")
    ap.add_argument("--scenes", type=int, default=40, help="procedural shape scenes added to the photos")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    bases = {k: center_square(v) for k, v in skimage_photos().items()}
    for i in range(args.scenes):
        bases[f"scene{i:02d}"] = shape_scene(rng)
    names = list(bases)
    det = SSIMDetector(resolution=args.resolution, max_shift=args.max_shift)
    print(f"SSIM detector at {args.resolution} px, max shift {args.max_shift} px; {len(names)} base images "
          f"({len(names) - args.scenes} skimage photos, {args.scenes} shape scenes); "
          f"degradations at {args.gen_resolutions} px")

    copies: dict[str, list[float]] = {}
    non_copies: list[float] = []
    hardest: list[tuple[float, str, str]] = []
    for gen_res in args.gen_resolutions:
        clean = [bases[n].resize((gen_res, gen_res), Image.Resampling.BICUBIC) for n in names]
        degraded = [degradations(im, rng) for im in clean]
        f_clean = det.embed(clean)
        for kind in degraded[0]:
            f_deg = det.embed([d[kind] for d in degraded])
            sim = det.similarity(f_deg, f_clean).numpy()
            copies.setdefault(kind, []).extend(np.diag(sim).tolist())
            if kind in ("noise.05", "combo"):  # a degraded image vs every *other* clean image
                off = sim[~np.eye(len(names), dtype=bool)]
                non_copies.extend(off.tolist())
        sim = det.similarity(f_clean, f_clean).numpy()
        for i, j in itertools.combinations(range(len(names)), 2):
            non_copies.append(float(sim[i, j]))
            hardest.append((float(sim[i, j]), names[i], names[j]))

    all_copies = np.array([v for vs in copies.values() for v in vs])
    nc = np.array(non_copies)
    print("\nknown copies (degraded vs original):")
    for kind, vs in copies.items():
        print("  " + stats(kind, np.array(vs)))
    print("  " + stats("ALL copies", all_copies))
    print("known non-copies (different images):")
    print("  " + stats("ALL non-copies", nc))
    print("  hardest non-copy pairs: " + ", ".join(f"{a}~{b} {s:.3f}" for s, a, b in sorted(hardest)[-5:][::-1]))

    lo, hi = nc.max(), all_copies.min()
    if hi > lo:
        mid = (lo + hi) / 2
        thr = float(np.clip(round(mid / 0.05) * 0.05, lo + 1e-6, hi - 1e-6))
        rule = f"gap ({lo:.3f}, {hi:.3f}); midpoint {mid:.3f}, rounded to 0.05 inside the gap"
    else:
        p995 = float(np.percentile(nc, 99.5))
        thr = math.ceil(p995 / 0.05 - 1e-9) * 0.05
        rule = (f"distributions overlap ({lo:.3f} > {hi:.3f}); 99.5th percentile of non-copies "
                f"({p995:.3f}) rounded up to 0.05")
    for label, t in (("chosen", thr), ("default SSIM_THRESHOLD", SSIM_THRESHOLD)):
        tpr = float((all_copies > t).mean())
        fpr = float((nc > t).mean())
        print(f"{label:<24} threshold={t:.3f}: copies detected {100 * tpr:.1f}%, non-copies flagged {100 * fpr:.2f}%")
    print(f"rule: {rule}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
