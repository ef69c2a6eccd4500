"""The demo's offline world: captions that underdetermine their images, as real captions do.

Layout written by ``build_demo_dataset(out_dir)``::

    out_dir/train/metadata.jsonl   imagefolder: file_name, caption, group ("duplicated" | "unique"), named
    out_dir/train/*.png
    out_dir/heldout/metadata.jsonl fresh scenes from the same world (evaluation only), naming no
                                   coloured shape of a photo (:func:`photo_shapes_of`)
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

**The web world** (``web:`` set, :class:`WebConfig`): the same photos, scenes and base vocabulary, but each
photo is reached as images are on the web. Its copies carry several wordings of its caption
(:func:`split_wordings`: the two shapes in either order, synonyms), drawn at random per copy, and a
share of them carry a caption *list* of all those wordings (the trainer draws one per step). A share of its copies are near-duplicates (:func:`photo_variant`: JPEG re-encodes, crops
of 88-95% of the side, brightness changes) rather than exact. Evaluation also asks with wordings that
no training row carries (the manifest's ``paraphrases``: other orders and synonyms, or a colour left out). Rows then have ``caption`` (their wording or
the list's first) and ``captions`` (their list: one entry for most rows); the trainer reads
``captions``.

Every named attribute is stored in ``named`` (``memreg.demo.adherence`` checks exactly those).
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageEnhance

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


WEB_GENERATOR = 2
"""The web world's generator version, part of its data cache key: bump it when the web rows or wordings
written for the same settings change (a cached world of the old rule is then rebuilt, not reused)."""

HELDOUT_GENERATOR = 2
"""The held-out split's generator version, part of every world's data cache key (2: held-out captions
name no photo's coloured shape, :func:`photo_shapes_of`)."""


@dataclass
class WebConfig:
    """How the ``web`` world reaches each memorized photo (see the module docstring)."""
    train_wordings: int = 4        # wordings of each photo in training (its canonical caption among them)
    unseen_wordings: int = 3       # further wordings asked at evaluation only
    list_share: float = 0.25       # copies whose caption is the list of every training wording
    near_dup_share: float = 0.5    # copies that are a near-duplicate instead of the photo itself
    near_dup_variants: int = 4     # distinct near-duplicates of each photo (NEAR_DUP_KINDS in turn)

    def __post_init__(self):
        if self.train_wordings < 1 or self.unseen_wordings < 1:
            raise ValueError("web: train_wordings and unseen_wordings must be >= 1")
        for name in ("list_share", "near_dup_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"web: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.near_dup_variants < 1:
            raise ValueError("web: near_dup_variants must be >= 1")


@dataclass
class DemoDataConfig:
    seed: int = 0
    n_dup: int = 8                 # photos to memorize
    dup_copies: int = 48           # copies of each photo in the training set
    n_unique: int = 600            # unique procedural training scenes
    n_heldout: int = 128           # held-out scenes (fresh draws of the same world)
    resolution: int = 16
    world: WorldConfig = field(default_factory=WorldConfig)
    web: WebConfig | None = None   # None: one caption and exact copies per photo; set: the web world

    def __post_init__(self):
        if isinstance(self.world, dict):
            self.world = WorldConfig(**self.world)
        if isinstance(self.web, dict):
            self.web = WebConfig(**self.web)

    def base_world(self) -> "DemoDataConfig":
        """This config without ``web``: what the base model is built from, so both worlds share one base."""
        return DemoDataConfig(**{**asdict(self), "web": None})


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


def wordings_of(named: dict) -> list[str]:
    """Every wording of a two-shape caption, the canonical one (:func:`caption_of`) first: the two
    shapes in either order, with both colours or one left out, each word that has a synonym as
    itself or the synonym. All of them use words the base model learned."""
    shapes = ((named["color"], named["shape"]), (named["pair"]["color"], named["pair"]["shape"]))
    syn = [w for w in dict.fromkeys(w for c_s in shapes for w in c_s) if w in SYNONYMS]
    out = []
    for order in (shapes, shapes[::-1]):
        for drop in (None, 0, 1):                    # the colour of the first or second shape left out
            for mask in itertools.product((False, True), repeat=len(syn)):
                sub = {w: SYNONYMS[w] for w, on in zip(syn, mask) if on}
                out.append(" and ".join(
                    f"a {sub.get(s_, s_)}" if k == drop else f"a {sub.get(c, c)} {sub.get(s_, s_)}"
                    for k, (c, s_) in enumerate(order)))
    return list(dict.fromkeys(out))


def split_wordings(named: dict, web: WebConfig, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(training wordings: the canonical caption first, then ``train_wordings - 1`` drawn from the
    other wordings that name both colours; ``unseen_wordings`` drawn from every wording left, for
    evaluation only). Training wordings name both shapes' colours because a wording without one
    ("a square and a violet cross") would tie the photo to every caption with those two shapes, so
    ordinary held-out captions ("a white square and a purple cross") would reach the photo and stop
    being held-out (measured: README, the web world). Raises if the caption has too few wordings."""
    every = wordings_of(named)
    full = [w for w in every if w.count(" ") == every[0].count(" ")]     # both colours named: as many words
    if web.train_wordings > len(full) or web.train_wordings + web.unseen_wordings > len(every):
        raise ValueError(f"web: {web.train_wordings} training + {web.unseen_wordings} unseen wordings asked, "
                         f"{caption_of(named)!r} has {len(full)} naming both colours and {len(every)} in all")
    others = [full[i] for i in rng.permutation(len(full) - 1) + 1]
    train = [full[0]] + others[:web.train_wordings - 1]
    rest = [w for w in every if w not in train]
    return train, [rest[i] for i in rng.permutation(len(rest))[:web.unseen_wordings]]


# ---------------------------------------------------------------------------------------------- scenes

def random_scene(rng: np.random.Generator, world: WorldConfig, forbidden_pairs: set = frozenset(),
                 forbidden_shapes: set = frozenset()) -> Scene:
    """One scene and the part of it its caption names; it names no (colour, shape) of
    ``forbidden_shapes`` (drawn among the others, uniformly, as the two independent draws would)."""
    colors, shapes = list(COLORS), list(SHAPES)
    background = colors[int(rng.integers(len(colors)))]
    main_colors = [c for c in colors if c != background]
    named: dict = {}
    if rng.random() < world.p_position:
        named["position"] = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    if rng.random() < world.p_background:
        named["background"] = background
    if forbidden_shapes:
        allowed = [(c, s) for c in main_colors for s in shapes if (c, s) not in forbidden_shapes]
        if not allowed:
            raise ValueError(f"every coloured shape on a {background} background is forbidden: too many photos")
        c1, s1 = allowed[int(rng.integers(len(allowed)))]
    else:   # the same draws as before the rule existed, so training scenes keep their bits
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
    others = [(c, s) for c in main_colors for s in shapes
              if c != c1 and s != s1 and pair_key((c1, s1), (c, s)) not in forbidden_pairs
              and (c, s) not in forbidden_shapes]
    if rng.random() < world.p_pair and "position" not in named and others:
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
               forbidden_pairs: set, forbidden_shapes: set = frozenset()) -> list[tuple[Image.Image, dict]]:
    """``n`` rendered scenes with their metadata rows (caption with synonyms drawn from ``rng``)."""
    rows = []
    for i in range(n):
        scene = random_scene(rng, world, forbidden_pairs, forbidden_shapes)
        caption = caption_of(scene.named, _surface_words(scene.named, rng, world.p_synonym))
        rows.append((render_scene(scene, resolution, rng),
                     {"file_name": f"{prefix}_{i:05d}.png", "caption": caption, "group": group,
                      "named": scene.named}))
    return rows


# ---------------------------------------------------------------------------------------------- photos

NEAR_DUP_KINDS = ("jpeg", "crop", "brightness", "crop")   # the near-duplicates of a photo, in turn


def photo_square(name: str) -> Image.Image:
    """A scikit-image bundled photo as an RGB centre-cropped square at its own resolution."""
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
    return img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def load_photo(name: str, resolution: int) -> Image.Image:
    """A scikit-image bundled photo as an RGB center-cropped square at ``resolution``."""
    return photo_square(name).resize((resolution, resolution), Image.LANCZOS)


def photo_variant(name: str, resolution: int, kind: str, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate of photo ``name`` at ``resolution``: ``jpeg`` (re-encoded at quality 40-70),
    ``crop`` (a square window of 88-95% of the side anywhere in the photo, resized: as a re-upload
    cropped differently) or ``brightness`` (x0.85-0.92 or x1.08-1.15)."""
    if kind == "crop":
        src = photo_square(name)
        side = int(round(src.width * rng.uniform(0.88, 0.95)))
        x, y = (int(rng.integers(0, src.width - side + 1)) for _ in range(2))
        return src.crop((x, y, x + side, y + side)).resize((resolution, resolution), Image.LANCZOS)
    img = load_photo(name, resolution)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(40, 71)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "brightness":
        factor = rng.uniform(0.85, 0.92) if rng.random() < 0.5 else rng.uniform(1.08, 1.15)
        return ImageEnhance.Brightness(img).enhance(float(factor))
    raise ValueError(f"unknown near-duplicate kind {kind!r}; choose from {sorted(set(NEAR_DUP_KINDS))}")


def forbidden_pairs_of(targets: list[dict]) -> set:
    return {pair_key((t["color"], t["shape"]), (t["pair"]["color"], t["pair"]["shape"])) for t in targets}


def shapes_named(named: dict) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption's ``named`` attributes name: one, or two with a pair."""
    return {(named["color"], named["shape"])} | ({(named["pair"]["color"], named["pair"]["shape"])}
                                                 if "pair" in named else set())


def photo_shapes_of(targets: list[dict]) -> set[tuple[str, str]]:
    """Every coloured shape a photo's caption names. A caption naming one of them is one of that
    photo's partial wordings (the unseen wordings are such: "a circle and a black triangle"), and a
    plain fine-tune's generations for it reach the photo: held-out captions, and the ordinary prompts
    that calibrate the mitigation, name none of them (README, "The held-out captions")."""
    return set().union(*(shapes_named(t) for t in targets)) if targets else set()


def photo_rows(name: str, named: dict, cfg: DemoDataConfig) -> list[tuple[Image.Image, dict]]:
    """The first world's copies of photo ``name``: ``dup_copies`` exact copies under its one caption."""
    photo, caption = load_photo(name, cfg.resolution), caption_of(named)
    return [(photo, {"file_name": f"photo_{name}_{k:03d}.png", "caption": caption, "group": "duplicated",
                     "source": name, "variant": "original", "named": named}) for k in range(cfg.dup_copies)]


def web_photo_rows(name: str, named: dict, cfg: DemoDataConfig,
                   rng: np.random.Generator) -> tuple[list[tuple[Image.Image, dict]], dict]:
    """The web world's copies of photo ``name`` (module docstring) and its manifest entry: the
    canonical ``caption``, the ``train_wordings``, and the ``paraphrases`` asked at evaluation, which
    here are the unseen wordings (``unseen_<k>``)."""
    web = cfg.web
    train_w, unseen = split_wordings(named, web, rng)
    photo = load_photo(name, cfg.resolution)
    variants = [(f"{NEAR_DUP_KINDS[k % len(NEAR_DUP_KINDS)]}{k}",
                 photo_variant(name, cfg.resolution, NEAR_DUP_KINDS[k % len(NEAR_DUP_KINDS)], rng))
                for k in range(web.near_dup_variants)]
    rows = []
    for k in range(cfg.dup_copies):
        variant, img = ("original", photo) if rng.random() >= web.near_dup_share \
            else variants[int(rng.integers(len(variants)))]
        captions = list(train_w) if rng.random() < web.list_share else [train_w[int(rng.integers(len(train_w)))]]
        rows.append((img, {"file_name": f"photo_{name}_{k:03d}.png", "caption": captions[0], "captions": captions,
                           "group": "duplicated", "source": name, "variant": variant, "named": named}))
    entry = {"source": name, "caption": train_w[0], "named": named, "train_wordings": train_w,
             "paraphrases": {f"unseen_{k}": w for k, w in enumerate(unseen)}}
    return rows, entry


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
    web_rng = np.random.default_rng(cfg.seed + 3)   # the web world's draws: the scenes stay those of the first world
    for name, named in zip(photos, targets):
        if cfg.web is None:
            memorized.append({"source": str(name), "caption": caption_of(named), "named": named,
                              "paraphrases": paraphrases(named)})
            train += photo_rows(str(name), named, cfg)
        else:
            rows, entry = web_photo_rows(str(name), named, cfg, web_rng)
            train += rows
            memorized.append(entry)
    train += scene_rows(cfg.n_unique, rng, cfg.world, cfg.resolution, "scene", "unique", forbidden)
    held = scene_rows(cfg.n_heldout, np.random.default_rng(cfg.seed + 2), cfg.world, cfg.resolution, "heldout",
                      "heldout", forbidden, photo_shapes_of(targets))
    if cfg.web is not None:   # one column type for every row: a list of wordings
        for _, meta in train + held:
            meta.setdefault("captions", [meta["caption"]])

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
