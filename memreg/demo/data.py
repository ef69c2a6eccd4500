"""The demo's offline dataset: duplicated real photos to memorize, procedural scenes to generalize.

Layout written by ``build_demo_dataset(out_dir)``::

    out_dir/train/metadata.jsonl   imagefolder: file_name, caption, group ("duplicated" | "unique"), source
    out_dir/train/*.png
    out_dir/heldout/metadata.jsonl compositions never seen in training (evaluation only)
    out_dir/heldout/*.png
    out_dir/manifest.json          the knobs and the counts

*Memorization targets* are photos bundled with scikit-image (no download), each with one unique
caption, written ``dup_copies`` times under different file names. The *generalizing majority* are
procedural scenes ("a red circle on a blue background, top left"), each image unique (jittered size,
position and texture). *Held-out* scenes use (shape, colour, background, position) combinations that
no training scene uses.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# scikit-image photos that load offline, with one caption each.
PHOTOS = {
    "astronaut": "a portrait photo of an astronaut in a white space suit",
    "coffee": "a photo of a cup of coffee on a saucer",
    "chelsea": "a photo of a tabby cat named chelsea",
    "rocket": "a photo of a rocket on the launch pad",
    "camera": "a black and white photo of a man with a camera",
    "coins": "a gray photo of old coins on a table",
    "moon": "a gray photo of the surface of the moon",
    "horse": "a black silhouette of a horse",
    "colorwheel": "a picture of a color wheel",
    "retina": "a medical photo of a human retina",
    "brick": "a gray photo of a brick wall",
    "clock": "a gray photo of a wall clock",
    "logo": "the logo of an image processing library",
    "hubble_deep_field": "the hubble deep field of distant galaxies",
    "immunohistochemistry": "a microscope image of stained tissue",
    "cell": "a microscope image of a living cell",
    "page": "a scanned page of printed text",
    "grass": "a gray photo of grass",
    "gravel": "a gray photo of gravel",
    "text": "a photo of handwritten text on a sign",
}

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
             "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background, {self.position}"


@dataclass
class DemoDataConfig:
    seed: int = 0
    n_dup: int = 16            # photos to memorize
    dup_copies: int = 24       # copies of each photo in the training set
    n_unique: int = 600        # unique procedural training scenes
    n_heldout: int = 64        # held-out procedural scenes (unseen compositions)
    resolution: int = 32
    heldout_composition_fraction: float = 0.2


def all_scenes() -> list[Scene]:
    return [Scene(s, c, b, p) for s, c, b, p in itertools.product(SHAPES, COLORS, COLORS, POSITIONS) if c != b]


def split_compositions(seed: int, heldout_fraction: float) -> tuple[list[Scene], list[Scene]]:
    """Deterministic split of all compositions into (train, held-out)."""
    scenes = all_scenes()
    order = np.random.default_rng(seed).permutation(len(scenes))
    n_held = int(round(heldout_fraction * len(scenes)))
    held = {int(i) for i in order[:n_held]}
    return [s for i, s in enumerate(scenes) if i not in held], [s for i, s in enumerate(scenes) if i in held]


def render_scene(scene: Scene, resolution: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene with jittered size/position and light texture noise (each draw is unique)."""
    big = resolution * 4  # supersample, then downscale for anti-aliasing
    img = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    cx, cy = POSITIONS[scene.position]
    cx = (cx + rng.uniform(-0.06, 0.06)) * big
    cy = (cy + rng.uniform(-0.06, 0.06)) * big
    r = rng.uniform(0.16, 0.22) * big
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 2.5
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    img = img.resize((resolution, resolution), Image.LANCZOS)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (resolution, resolution, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def load_photo(name: str, resolution: int) -> Image.Image:
    """A scikit-image bundled photo as an RGB center-cropped square at ``resolution``."""
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-8)).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    img = Image.fromarray(arr[..., :3])
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((resolution, resolution), Image.LANCZOS)


def _write_split(folder: Path, rows: list[tuple[Image.Image, dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w") as f:
        for img, meta in rows:
            img.save(folder / meta["file_name"])
            f.write(json.dumps(meta) + "\n")


def build_demo_dataset(out_dir: str | Path, cfg: DemoDataConfig = DemoDataConfig()) -> dict:
    """Write the demo dataset (see module docstring); refuses a non-empty ``out_dir``. Returns the manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"demo data dir {str(out_dir)!r} is not empty; refusing to overwrite it")
    if not 1 <= cfg.n_dup <= len(PHOTOS):
        raise ValueError(f"n_dup must be in [1, {len(PHOTOS)}] (bundled photos), got {cfg.n_dup}")
    if cfg.resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {cfg.resolution}")
    rng = np.random.default_rng(cfg.seed)
    train_scenes, held_scenes = split_compositions(cfg.seed, cfg.heldout_composition_fraction)

    train: list[tuple[Image.Image, dict]] = []
    for name in list(PHOTOS)[:cfg.n_dup]:
        photo = load_photo(name, cfg.resolution)
        for k in range(cfg.dup_copies):
            train.append((photo, {"file_name": f"photo_{name}_{k:03d}.png", "caption": PHOTOS[name],
                                  "group": "duplicated", "source": name}))
    for i, j in enumerate(rng.choice(len(train_scenes), size=cfg.n_unique, replace=cfg.n_unique > len(train_scenes))):
        scene = train_scenes[int(j)]
        train.append((render_scene(scene, cfg.resolution, rng), {
            "file_name": f"scene_{i:05d}.png", "caption": scene.caption, "group": "unique", **asdict(scene)}))

    held: list[tuple[Image.Image, dict]] = []
    for i, j in enumerate(rng.choice(len(held_scenes), size=cfg.n_heldout, replace=cfg.n_heldout > len(held_scenes))):
        scene = held_scenes[int(j)]
        held.append((render_scene(scene, cfg.resolution, rng), {
            "file_name": f"heldout_{i:05d}.png", "caption": scene.caption, "group": "heldout", **asdict(scene)}))

    _write_split(out_dir / "train", train)
    _write_split(out_dir / "heldout", held)
    manifest = {"config": asdict(cfg), "n_train": len(train), "n_heldout": len(held),
                "n_duplicated_images": cfg.n_dup * cfg.dup_copies, "n_unique_scenes": cfg.n_unique,
                "photos": list(PHOTOS)[:cfg.n_dup]}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
