"""Training data: an imagefolder (``train_data_dir`` + ``metadata.jsonl``) or a hub dataset.

* Loading goes through ``datasets.load_dataset`` ("imagefolder" with ``data_dir``, or
  ``dataset_name``/``dataset_config_name``), with the image column read undecoded so images are
  opened here, lazily, from their path or bytes.
* A caption may be a string or a list of strings; a list gives one caption per sample and epoch,
  picked at random as diffusers does. ``proportion_empty_prompts`` replaces that fraction of
  captions by "" (as diffusers' SDXL script does) so the unconditional branch used by
  classifier-free guidance is trained.
* Randomness (caption choice, random crop, flip) comes from a generator keyed on
  ``(seed, epoch, index)``: the training seed fixes it, it does not depend on worker count or
  process, and a resumed run sees the same samples. :class:`EpochSampler` shuffles by
  ``(seed, epoch)``; with ``accelerator.skip_first_batches`` a resume lands on the same batch.
* Caption augmentation and repeats with kohya's semantics (``shuffle_caption``, ``keep_tokens``,
  ``caption_dropout_rate``, ``caption_tag_dropout_rate``, ``num_repeats``; :mod:`memreg.training.captions`):
  applied to the chosen caption from a sub-stream of the sample's key; a repeat r > 0 of a sample
  is keyed ``(seed, epoch, index, r)``. All off, every key and draw is as without them.
* ``eval.heldout_fraction`` > 0 splits that fraction out of the training set (deterministic
  by seed); held-out samples are never trained on and are handed to the monitor.
* Corrupt or unreadable images: **skip with a count**. Every image is opened and verified once
  before training (``validate_images``); failures are dropped, counted, logged with the first
  few file names, and reported in ``DataSummary.skipped``. If nothing readable is left the run
  fails with :class:`DataError`. An image that passes verification but cannot be decoded later
  raises :class:`CorruptImageError` naming the file (no silent substitution mid-training).
* ``cache_latents``: the VAE encodes every training image once (both orientations when
  ``random_flip``) and the latent distribution's mean/std are kept; each step samples from it
  with the training RNG, as an uncached step does. A cached crop is the center crop.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memreg import image_ops
from memreg.errors import MemregError, one_line
from memreg.families.sdxl import flipped_crop_left
from memreg.image_io import ImageDecodeError, load_rgb, open_image
from memreg.imagefolder import MetadataError, check_imagefolder
from memreg.training import captions as caption_aug

logger = logging.getLogger(__name__)


class DataError(MemregError, ValueError):
    """Training data that cannot be used; the message names the file, directory or column."""


class CorruptImageError(DataError):
    """An image that passed the pre-training check failed to decode."""


@dataclass
class DataSummary:
    num_total: int
    num_train: int
    num_heldout: int
    skipped: int
    skipped_examples: list[str] = field(default_factory=list)


def _sample_key(seed: int, epoch: int, index: int, repeat: int = 0) -> list[int]:
    """The sample's RNG entropy; a repeat > 0 (``num_repeats``) gets its own, repeat 0 today's key."""
    key = [int(seed) & 0xFFFFFFFF, int(epoch), int(index)]
    return key + [int(repeat)] if repeat else key


def _sample_rng(seed: int, epoch: int, index: int, repeat: int = 0) -> np.random.Generator:
    return np.random.default_rng(_sample_key(seed, epoch, index, repeat))


def check_data_source(train_data_dir: str | None, dataset_name: str | None, allow_external_files: bool = False) -> None:
    """Fail early, naming the path and line, if an imagefolder is missing, has no usable metadata.jsonl
    or (unless ``allow_external_files``) points outside itself (:mod:`memreg.imagefolder`)."""
    if train_data_dir is not None:
        p = Path(train_data_dir)
        if not p.exists():
            raise DataError(f"train_data_dir {train_data_dir!r} does not exist")
        if not p.is_dir():
            raise DataError(f"train_data_dir {train_data_dir!r} is not a directory")
        try:
            check_imagefolder(p, allow_external_files)
        except MetadataError as e:
            raise DataError(str(e)) from None
    elif dataset_name is None:
        raise DataError("no training data: set train_data_dir or dataset_name")


def load_hf_dataset(cfg):
    """The raw ``datasets.Dataset`` (train split) of the config, image column undecoded."""
    import datasets

    check_data_source(cfg.train_data_dir, cfg.dataset_name, cfg.allow_external_files)
    try:
        if cfg.dataset_name is not None:
            ds = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, cache_dir=cfg.cache_dir)
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=cfg.train_data_dir, cache_dir=cfg.cache_dir)
    except (ValueError, TypeError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        # arrow parse/cast errors, missing files; datasets wraps the cause in DatasetGenerationError
        src = cfg.dataset_name or cfg.train_data_dir
        cause = e.__cause__ or e.__context__ if isinstance(e, datasets.exceptions.DatasetGenerationError) else e
        raise DataError(f"could not load dataset {src!r}: {one_line(cause or e)}") from None
    if isinstance(ds, dict) or hasattr(ds, "keys"):
        if "train" not in ds:
            raise DataError(f"dataset {cfg.dataset_name or cfg.train_data_dir!r} has no 'train' split "
                            f"(splits: {list(ds.keys())})")
        ds = ds["train"]
    cols = list(ds.column_names)
    src = cfg.dataset_name or cfg.train_data_dir
    if cfg.image_column not in cols:
        raise DataError(f"image_column {cfg.image_column!r} not in dataset {src!r}; columns: {cols}")
    if cfg.caption_column not in cols:
        raise DataError(f"caption_column {cfg.caption_column!r} not in dataset {src!r}; columns: {cols}")
    ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    return ds


def _image_ref(value: Any) -> Any:
    """A path string, raw bytes or PIL image from a (possibly undecoded) image cell."""
    if isinstance(value, dict):
        if value.get("path") and os.path.exists(value["path"]):
            return value["path"]
        if value.get("bytes") is not None:
            return value["bytes"]
        return value.get("path")
    return value


def _describe(ref: Any, index: int) -> str:
    return ref if isinstance(ref, str) else f"<sample {index}>"


def verify_image(ref: Any) -> str | None:
    """None if the image opens and verifies, else the reason."""
    try:
        with open_image(ref) as img:
            img.verify()
        return None
    except Exception as e:  # PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"


def _normalize_caption(value: Any, index: int, column: str) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"caption column {column!r}, sample {index}: expected a string or a non-empty list of "
                    f"strings, got {value!r}")


def split_heldout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, heldout) index lists; the held-out set is a seeded random ``fraction`` of ``range(n)``."""
    if fraction <= 0 or n == 0:
        return list(range(n)), []
    k = int(round(fraction * n))
    k = min(max(k, 1), n - 1)
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7919]).permutation(n)
    held = sorted(int(i) for i in perm[:k])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


class TrainData:
    """Image references and captions of the usable samples, with the train/held-out split."""

    def __init__(self, refs: list[Any], captions: list[str | list[str]], train_idx: list[int],
                 heldout_idx: list[int], summary: DataSummary, repeats: list[int] | None = None):
        self.refs = refs
        self.captions = captions
        self.train_idx = train_idx
        self.heldout_idx = heldout_idx
        self.summary = summary
        self.repeats = repeats  # per sample (aligned with refs): times per epoch; None: once each

    def records(self, which: str = "train") -> list[dict]:
        """Monitor records ``{"image": path|PIL, "caption": str|list, "id": int}``."""
        idx = self.train_idx if which == "train" else self.heldout_idx
        out = []
        for i in idx:
            ref = self.refs[i]
            img = ref if isinstance(ref, str) else open_image(ref)
            out.append({"image": img, "caption": self.captions[i], "id": i})
        return out

    def train_captions(self) -> list[str | list[str]]:
        return [self.captions[i] for i in self.train_idx]


def build_train_data(cfg, seed: int, validate_images: bool = True) -> TrainData:
    """Load, check, filter unreadable images (skip-with-count) and split held-out samples."""
    ds = load_hf_dataset(cfg)
    n = len(ds)
    if cfg.max_train_samples is not None and cfg.max_train_samples < n:
        n = cfg.max_train_samples
        ds = ds.select(range(n))
    images = ds[cfg.image_column]
    raw_caps = ds[cfg.caption_column]
    refs = [_image_ref(v) for v in list(images)]
    captions = [_normalize_caption(c, i, cfg.caption_column) for i, c in enumerate(list(raw_caps))]
    keep, bad = [], []
    for i, ref in enumerate(refs):
        reason = verify_image(ref) if validate_images else None
        if reason is None:
            keep.append(i)
        else:
            bad.append(f"{_describe(ref, i)} ({reason})")
    src = cfg.dataset_name or cfg.train_data_dir
    if bad:
        logger.warning("skipped %d unreadable image(s) of %d in %s; first: %s", len(bad), n, src, "; ".join(bad[:5]))
    if not keep:
        raise DataError(f"dataset {src!r}: none of its {n} images could be read (first: {bad[:3]})")
    refs = [refs[i] for i in keep]
    captions = [captions[i] for i in keep]
    train_idx, held_idx = split_heldout(len(refs), cfg.eval.heldout_fraction, seed)
    summary = DataSummary(num_total=n, num_train=len(train_idx), num_heldout=len(held_idx),
                          skipped=len(bad), skipped_examples=bad[:20])
    try:
        repeats = caption_aug.sample_repeats(refs, caption_aug.from_train_config(cfg), cfg.train_data_dir)
    except caption_aug.RepeatsError as e:
        raise DataError(str(e)) from None
    return TrainData(refs, captions, train_idx, held_idx, summary, repeats=repeats)


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by ``(index, epoch)`` or ``(index, epoch, repeat)`` (the keys
    :class:`EpochSampler` yields). ``augment`` (:mod:`memreg.training.captions`) turns the chosen
    caption into the step's, from the caption sub-stream of the sample's key.

    Items: ``{"pixel_values": (3, R, R) in [-1, 1], "caption": str, "source_caption": str, "index": int}``,
    or with a latent cache ``{"latent_mean", "latent_std", "caption", "source_caption", "index"}``;
    ``source_caption`` is the dataset's wording the step's caption was made from (the chosen entry of a
    caption list, before augmentation and empty-prompt replacement): the guard probes that one, whose
    base-model value it has.
    """

    def __init__(self, data: TrainData, resolution: int, center_crop: bool, random_flip: bool, seed: int,
                 latent_cache: dict[str, torch.Tensor] | None = None, proportion_empty_prompts: float = 0.0,
                 augment: caption_aug.CaptionConfig | None = None):
        self.data = data
        self.augment = augment
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = int(seed)
        self.latent_cache = latent_cache
        self.proportion_empty_prompts = float(proportion_empty_prompts)

    def __len__(self) -> int:
        return len(self.data.train_idx)

    def _caption(self, caption, rng) -> str:
        if isinstance(caption, list):
            return caption[int(rng.integers(len(caption)))]
        return caption

    def __getitem__(self, key):
        index, epoch, repeat = (tuple(key) + (0,))[:3] if isinstance(key, tuple) else (key, 0, 0)
        rng = _sample_rng(self.seed, epoch, index, repeat)
        caption = source = self._caption(self.data.captions[index], rng)
        if self.augment is not None and self.augment.changes_captions:
            sub = caption_aug.caption_rng(_sample_key(self.seed, epoch, index, repeat))
            caption = caption_aug.augment_caption(caption, self.augment, sub)
        flip = bool(self.random_flip and rng.random() < 0.5)
        if self.proportion_empty_prompts > 0 and rng.random() < self.proportion_empty_prompts:
            caption = ""
        if self.latent_cache is not None:
            slot = self.latent_cache["slot"][index]
            which = 1 if flip else 0
            return {"latent_mean": self.latent_cache["mean"][slot, which],
                    "latent_std": self.latent_cache["std"][slot, which],
                    "caption": caption, "source_caption": source, "index": index,
                    "original_size": tuple(self.latent_cache["original_size"][slot].tolist()),
                    "crop_top_left": tuple(self.latent_cache["crop_top_left"][slot, which].tolist())}
        ref = self.data.refs[index]
        try:
            img = load_rgb(ref)
        except ImageDecodeError as e:
            raise CorruptImageError(f"image {_describe(ref, index)} could not be decoded: {e}") from None
        pixels, original, (top, left) = image_ops.preprocess_with_crop(img, self.resolution, self.center_crop, flip, rng)
        if flip:   # the crop's left edge as diffusers' SDXL scripts record it for a flipped image
            left = flipped_crop_left(left, self.resolution)
        return {"pixel_values": pixels, "caption": caption, "source_caption": source, "index": index,
                "original_size": original, "crop_top_left": (top, left)}


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, epoch)`` keys in an order fixed by ``(seed, epoch)``; with ``repeats`` (per
    sample, ``num_repeats``) an index comes that many times, its repeats r > 0 as ``(index, epoch, r)``.

    Deliberately has no ``generator`` attribute: accelerate then leaves the process RNGs alone.
    """

    def __init__(self, indices: list[int], seed: int, shuffle: bool = True, repeats: list[int] | None = None):
        self.indices = list(indices)
        self.keys = caption_aug.expand_repeats(self.indices, repeats)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, 104729, self.epoch]).permutation(len(self.keys))
        else:
            order = range(len(self.keys))
        for p in order:
            index, repeat = self.keys[int(p)]
            yield (index, self.epoch, repeat) if repeat else (index, self.epoch)


def collate(examples: list[dict]) -> dict:
    batch: dict[str, Any] = {"caption": [e["caption"] for e in examples],
                             "source_caption": [e["source_caption"] for e in examples],
                             "index": torch.tensor([e["index"] for e in examples], dtype=torch.long)}
    if "pixel_values" in examples[0]:
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples]).contiguous().float()
    else:
        batch["latent_mean"] = torch.stack([e["latent_mean"] for e in examples])
        batch["latent_std"] = torch.stack([e["latent_std"] for e in examples])
    # SDXL's size and crop conditioning: (B, 2) (height, width) before resizing and (top, left) of the crop
    batch["original_size"] = torch.tensor([e["original_size"] for e in examples], dtype=torch.long)
    batch["crop_top_left"] = torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.long)
    return batch


def make_dataloader(dataset: TrainDataset, batch_size: int, num_workers: int, seed: int) -> torch.utils.data.DataLoader:
    sampler = EpochSampler(dataset.data.train_idx, seed, repeats=getattr(dataset.data, "repeats", None))
    # The loader's own generator keeps iterator creation (worker base seeds) off the global RNG.
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFF)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, generator=gen, drop_last=False)


@torch.no_grad()
def build_latent_cache(data: TrainData, vae, resolution: int, random_flip: bool, device, dtype,
                       batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Encode every training image once: mean/std of shape (N, 2, C, h, w) (orientation 1 = flipped),
    and each image's ``original_size`` (N, 2) and centre ``crop_top_left`` (N, 2, 2) per orientation."""
    idx = data.train_idx
    slot = {i: s for s, i in enumerate(idx)}
    means, stds, sizes, crops = [], [], [], []
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        pix = []
        for i in chunk:
            x, original, (top, left) = image_ops.preprocess_with_crop(load_rgb(data.refs[i]), resolution, True, False)
            pix.append(x)
            sizes.append(original)
            crops.append([(top, left), (top, flipped_crop_left(left, resolution))])
        x = torch.stack(pix)
        views = [x, torch.flip(x, dims=[3])] if random_flip else [x]
        m_v, s_v = [], []
        for v in views:
            dist = vae.encode(v.to(device=device, dtype=dtype)).latent_dist
            m_v.append(dist.mean.float().cpu())
            s_v.append(dist.std.float().cpu())
        if not random_flip:
            m_v.append(m_v[0])
            s_v.append(s_v[0])
        means.append(torch.stack(m_v, dim=1))
        stds.append(torch.stack(s_v, dim=1))
    slots = torch.full((max(idx) + 1 if idx else 0,), -1, dtype=torch.long)
    for i, s in slot.items():
        slots[i] = s
    return {"mean": torch.cat(means), "std": torch.cat(stds), "slot": slots,
            "original_size": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
            "crop_top_left": torch.tensor(crops, dtype=torch.long).reshape(-1, 2, 2)}


def num_update_steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)
