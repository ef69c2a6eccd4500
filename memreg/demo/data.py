"""The demo's offline world: captions that underdetermine their images, as real captions do.

Layout written by ``build_demo_dataset(out_dir)``::

    out_dir/train/metadata.jsonl   imagefolder: file_name, caption, group ("duplicated" | "unique"), named
    out_dir/train/*.png
    out_dir/heldout/metadata.jsonl fresh scenes from the same world (evaluation only)
    out_dir/heldout/*.png
    out_dir/manifest.json          the knobs, the counts, the memorized captions and their paraphrases

**Ordinary items** are procedural scenes. A scene holds a main shape (colour, shape, size, position),
sometimes a second main shape, two small distractor shapes, a background colour with faint stripes
and a global lighting factor. Its caption names only a part of that: always the main shape's colour
and shape ("a red circle"), sometimes the background ("on a blue background"), the position ("top
left") or the second shape ("a red circle and a green cross"); synonyms ("crimson", "disc") stand in
for a share of the words. So one caption covers many different images, and a model that learns the
caption's distribution has no single image to collapse to.

**Memorization targets** are photos bundled with scikit-image (no download), each repeated
``dup_copies`` times with one fixed caption. Their captions are two-shape captions built from the
same vocabulary ("a purple square and a white disc"): the base model learned every word of them in
pre-training, on other images, as a real SD base knows the words of a LAION caption it later
memorizes. No scene in any split uses a target's shape pair, in either order.

Every named attribute is stored in ``named`` (``memreg.demo.adherence`` checks exactly those).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageDraw

# scikit-image photos that load offline and keep a recognisable layout at 16 px. Texture photos
# (brick, grass, gravel, page, text) are left out: at 16 px they are pixel noise that the SSIM copy
# check cannot confirm even for a perfect copy after a generator's blur (a first run with them: copy
# rates 0.00-0.19 for the textures, 0.81-0.88 for coffee and horse, same model).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "horse", "colorwheel",
          "retina", "clock", "logo")

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
             "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}
# Words with a second name: captions use the synonym for a share of their words, in every split.
SYNONYMS = {"red": "crimson", "purple": "violet", "circle": "disc", "square": "box", "center": "middle"}


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    x: float        # centre, fraction of the image side
    y: float
    r: float        # half-size, fraction of the image side


@dataclass(frozen=True)
class Scene:
    """Everything drawn in one image; ``named`` is the part its caption mentions."""
    objects: tuple[Shape, ...]          # main shape(s) first, then distractors
    background: str
    lighting: float
    stripes: float
    named: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class WorldConfig:
    """How much of a scene its caption names (probabilities per caption)."""
    p_background: float = 0.0      # "... on a blue background"
    p_position: float = 0.0        # "..., top left"
    p_pair: float = 0.25           # "a red circle and a green cross"
    p_synonym: float = 0.25        # per word that has a synonym
    n_distractors: int = 2         # small unnamed shapes


@dataclass
class DemoDataConfig:
    seed: int = 0
    n_dup: int = 8                 # photos to memorize
    dup_copies: int = 48           # copies of each photo in the training set
    n_unique: int = 600            # unique procedural training scenes
    n_heldout: int = 128           # held-out scenes (fresh draws of the same world)
    resolution: int = 16
    world: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self):
        if isinstance(self.world, dict):
            self.world = WorldConfig(**self.world)


# ---------------------------------------------------------------------------------------------- captions

def _word(w: str, rng: np.random.Generator, p_synonym: float) -> str:
    return SYNONYMS[w] if w in SYNONYMS and rng.random() < p_synonym else w


def caption_of(named: dict, words: dict | None = None) -> str:
    """The caption text for ``named`` attributes, with ``words`` mapping a canonical word to its surface form."""
    w = (lambda x: (words or {}).get(x, x))  # noqa: E731
    text = f"a {w(named['color'])} {w(named['shape'])}"
    if "pair" in named:
        text += f" and a {w(named['pair']['color'])} {w(named['pair']['shape'])}"
    if "background" in named:
        text += f" on a {w(named['background'])} background"
    if "position" in named:
        text += f", {w(named['position'])}"
    return text


def _surface_words(named: dict, rng: np.random.Generator, p_synonym: float) -> dict:
    words = [named["color"], named["shape"], named.get("background"), named.get("position")]
    if "pair" in named:
        words += [named["pair"]["color"], named["pair"]["shape"]]
    return {x: _word(x, rng, p_synonym) for x in words if x is not None}


def pair_key(a: tuple[str, str], b: tuple[str, str]) -> frozenset:
    return frozenset([a, b])


def target_captions(n: int, seed: int) -> list[dict]:
    """``n`` distinct two-shape captions for the photos; the first word of each has a synonym, so
    every target has a synonym paraphrase."""
    rng = np.random.default_rng(seed + 104_729)
    firsts = [(c, s) for c in COLORS for s in SHAPES if c in SYNONYMS or s in SYNONYMS]
    seconds = [(c, s) for c in COLORS for s in SHAPES]
    out, used = [], set()
    while len(out) < n:
        a = firsts[int(rng.integers(len(firsts)))]
        b = seconds[int(rng.integers(len(seconds)))]
        if a[0] == b[0] or a[1] == b[1] or pair_key(a, b) in used:
            continue
        used.add(pair_key(a, b))
        out.append({"color": a[0], "shape": a[1], "pair": {"color": b[0], "shape": b[1]}})
    return out


def paraphrases(named: dict) -> dict[str, str]:
    """Three perturbed variants of a two-shape caption: a word dropped, the shapes reordered, a synonym."""
    a = {"color": named["color"], "shape": named["shape"]}
    b = named["pair"]
    syn = named["color"] if named["color"] in SYNONYMS else named["shape"]
    return {
        "drop": f"a {a['color']} {a['shape']} and a {b['shape']}",
        "reorder": caption_of({**b, "pair": a}),
        "synonym": caption_of(named, {syn: SYNONYMS[syn]}),
    }


# ---------------------------------------------------------------------------------------------- scenes

def random_scene(rng: np.random.Generator, world: WorldConfig, forbidden_pairs: set = frozenset()) -> Scene:
    """One scene and the part of it its caption names."""
    colors, shapes = list(COLORS), list(SHAPES)
    background = colors[int(rng.integers(len(colors)))]
    main_colors = [c for c in colors if c != background]
    named: dict = {}
    if rng.random() < world.p_position:
        named["position"] = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    if rng.random() < world.p_background:
        named["background"] = background
    c1 = main_colors[int(rng.integers(len(main_colors)))]
    s1 = shapes[int(rng.integers(len(shapes)))]
    named.update(color=c1, shape=s1)
    objects = []
    if "position" in named:
        cx, cy = POSITIONS[named["position"]]
        x, y = cx + rng.uniform(-0.05, 0.05), cy + rng.uniform(-0.05, 0.05)
    else:
        x, y = rng.uniform(0.25, 0.75, size=2)
    objects.append(Shape(s1, c1, float(x), float(y), float(rng.uniform(0.15, 0.21))))
    if rng.random() < world.p_pair and "position" not in named:
        others = [(c, s) for c in main_colors for s in shapes
                  if c != c1 and s != s1 and pair_key((c1, s1), (c, s)) not in forbidden_pairs]
        c2, s2 = others[int(rng.integers(len(others)))]
        named["pair"] = {"color": c2, "shape": s2}
        # the two shapes side by side, the named first one on the left or top
        if rng.random() < 0.5:
            objects[0] = Shape(s1, c1, 0.3, float(rng.uniform(0.3, 0.7)), objects[0].r * 0.85)
            objects.append(Shape(s2, c2, 0.72, float(rng.uniform(0.3, 0.7)), objects[0].r))
        else:
            objects[0] = Shape(s1, c1, float(rng.uniform(0.3, 0.7)), 0.3, objects[0].r * 0.85)
            objects.append(Shape(s2, c2, float(rng.uniform(0.3, 0.7)), 0.72, objects[0].r))
    main = {o.color for o in objects}
    for _ in range(world.n_distractors):
        dc = [c for c in main_colors if c not in main]
        objects.append(Shape(shapes[int(rng.integers(len(shapes)))], dc[int(rng.integers(len(dc)))],
                             float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.1, 0.9)),
                             float(rng.uniform(0.04, 0.06))))
    return Scene(tuple(objects), background, float(rng.uniform(0.92, 1.08)), float(rng.uniform(0.0, 0.08)),
                 named=named)


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, big: int) -> None:
    cx, cy, r = s.x * big, s.y * big, s.r * big
    fill = COLORS[s.color]
    if s.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 2.5
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def render_scene(scene: Scene, resolution: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` (supersampled, then downscaled) with its stripes, lighting and pixel noise."""
    big = resolution * 4
    img = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    bg = np.array(COLORS[scene.background], dtype=np.float32)
    step = max(2, big // 8)
    for k in range(0, big, 2 * step):  # faint stripes: unnamed background texture
        draw.rectangle([0, k, big, k + step - 1], fill=tuple(int(v) for v in np.clip(bg * (1 - scene.stripes), 0, 255)))
    for s in scene.objects:
        _draw_shape(draw, s, big)
    img = img.resize((resolution, resolution), Image.LANCZOS)
    arr = np.asarray(img).astype(np.float32) * scene.lighting + rng.normal(0, 5, (resolution, resolution, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def scene_rows(n: int, rng: np.random.Generator, world: WorldConfig, resolution: int, prefix: str, group: str,
               forbidden_pairs: set) -> list[tuple[Image.Image, dict]]:
    """``n`` rendered scenes with their metadata rows (caption with synonyms drawn from ``rng``)."""
    rows = []
    for i in range(n):
        scene = random_scene(rng, world, forbidden_pairs)
        caption = caption_of(scene.named, _surface_words(scene.named, rng, world.p_synonym))
        rows.append((render_scene(scene, resolution, rng),
                     {"file_name": f"{prefix}_{i:05d}.png", "caption": caption, "group": group,
                      "named": scene.named}))
    return rows


# ---------------------------------------------------------------------------------------------- photos

def load_photo(name: str, resolution: int) -> Image.Image:
    """A scikit-image bundled photo as an RGB center-cropped square at ``resolution``."""
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


def forbidden_pairs_of(targets: list[dict]) -> set:
    return {pair_key((t["color"], t["shape"]), (t["pair"]["color"], t["pair"]["shape"])) for t in targets}


# ---------------------------------------------------------------------------------------------- dataset

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
    photos = list(np.random.default_rng(cfg.seed + 1).permutation(PHOTOS)[:cfg.n_dup])
    targets = target_captions(cfg.n_dup, cfg.seed)
    forbidden = forbidden_pairs_of(targets)

    train: list[tuple[Image.Image, dict]] = []
    memorized = []
    for name, named in zip(photos, targets):
        photo, caption = load_photo(str(name), cfg.resolution), caption_of(named)
        memorized.append({"source": str(name), "caption": caption, "named": named, "paraphrases": paraphrases(named)})
        for k in range(cfg.dup_copies):
            train.append((photo, {"file_name": f"photo_{name}_{k:03d}.png", "caption": caption,
                                  "group": "duplicated", "source": str(name), "named": named}))
    train += scene_rows(cfg.n_unique, rng, cfg.world, cfg.resolution, "scene", "unique", forbidden)
    held = scene_rows(cfg.n_heldout, np.random.default_rng(cfg.seed + 2), cfg.world, cfg.resolution, "heldout",
                      "heldout", forbidden)

    _write_split(out_dir / "train", train)
    _write_split(out_dir / "heldout", held)
    manifest = {"config": asdict(cfg), "n_train": len(train), "n_heldout": len(held),
                "n_duplicated_images": cfg.n_dup * cfg.dup_copies, "n_unique_scenes": cfg.n_unique,
                "memorized": memorized}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def pretrain_rows(n: int, cfg: DemoDataConfig) -> list[tuple[Image.Image, dict]]:
    """The base model's pre-training data: scenes of the same world (other draws), no photos, no target pairs."""
    forbidden = forbidden_pairs_of(target_captions(cfg.n_dup, cfg.seed))
    return scene_rows(n, np.random.default_rng(cfg.seed + 7919), cfg.world, cfg.resolution, "pre", "pretrain",
                      forbidden)
