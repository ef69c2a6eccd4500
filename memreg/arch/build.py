"""Random-weight pipelines at the published architectures of SD 1.5, SD 2.1 and SDXL base 1.0.

``build_pipeline_dir(family, out_dir, sample_size=8)`` reads the family's published component
configs from ``memreg/arch/<family>/`` (README.md there names their sources), builds every component
with random weights (seeded), writes a local byte-level BPE tokenizer
(:func:`memreg.testing.write_tiny_clip_tokenizer`, with the family's pad token), and saves the lot
in diffusers format with safetensors weights, so ``memreg.models.load_components(dir)`` and
diffusers' ``from_pretrained(dir)`` read it exactly as a downloaded checkpoint. Nothing is fetched.

Two values differ from the published files, and only these:

* ``sample_size`` (the UNet's latent size; the VAE's becomes 8x that), so pipelines default to a
  small resolution (``sample_size=8``: 64 px images) that a CPU can run;
* ``blocks`` (optional): a cap on the transformer blocks per attention. SDXL's
  ``transformer_layers_per_block`` [1, 2, 10] holds 2.1B of its UNet's 2.6B parameters in the
  10-deep level; full fine-tuning with AdamW needs weights + gradients + two moments = 16 bytes a
  parameter, about 41 GB for the real UNet, which a 24 GiB machine cannot hold, so its full
  fine-tuning needs ``blocks=1`` ([1, 1, 1]: a 0.64B-parameter UNet, ~10 GB with AdamW; every
  layer type and width of the real one otherwise). SD 1.x/2.x have one block per attention already.

Weights are built and saved in fp32, as the published checkpoints' main files are (a text encoder
config's ``torch_dtype`` records the file it was last saved with: ``float16`` for SD 2.1's and
SDXL's; transformers 5 would build such a model in fp16).

The components are built, saved and freed one at a time (peak memory: the largest component, the
UNet: 3.4 GB fp32 for SD 1.5/2.1, 10.3 GB for SDXL). Components the published pipelines carry but
memreg never uses (safety checker, feature extractor, image encoder) are left out, as
``model_index.json`` then says.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from memreg.errors import MemregError
from memreg.testing import write_tiny_clip_tokenizer

ARCH_DIR = Path(__file__).resolve().parent
FAMILIES = ("sd15", "sd21", "sdxl")
BUILD_VERSION = 2          # bump when the builder's output changes for the same configs (fixture caches key on it)
INFO_NAME = "memreg_arch.json"
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
TEXT_ENCODERS = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
MAX_SHARD = "40GB"         # one weight file per component, as the published checkpoints ship them


class ArchError(MemregError, ValueError):
    """A build request that cannot be served (unknown family, bad size, non-empty output dir)."""


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ArchError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def config_files(family: str) -> list[Path]:
    """Every published config file of ``family`` (relative order fixed: sorted paths)."""
    return sorted((ARCH_DIR / check_family(family)).rglob("*.json"))


def published_config(family: str, component: str) -> dict:
    """The published config of one component (``model_index``, ``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2``, ``scheduler``, ``tokenizer``, ``tokenizer_2``) as a fresh dict."""
    root = ARCH_DIR / check_family(family)
    name = {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json"}.get(component)
    if name is None:
        name = f"{component}/special_tokens_map.json" if component.startswith("tokenizer") else f"{component}/config.json"
    path = root / name
    if not path.is_file():
        raise ArchError(f"{family} has no component {component!r} ({path} missing)")
    return json.loads(path.read_text())


def components(family: str) -> list[str]:
    """The pipeline components built for ``family``: the published model_index's, minus the unused ones."""
    index = published_config(family, "model_index")
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
            and v[0] is not None and k not in UNUSED_COMPONENTS]


def config_digest(family: str) -> str:
    """sha256 over the family's published config files (their paths and bytes)."""
    h = hashlib.sha256()
    for path in config_files(family):
        h.update(str(path.relative_to(ARCH_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cap_blocks(depth, blocks: int):
    """``transformer_layers_per_block`` (an int or one entry per level) capped at ``blocks``."""
    return min(depth, blocks) if isinstance(depth, int) else [min(d, blocks) for d in depth]


def unet_config(family: str, sample_size: int, blocks: int | None = None) -> dict:
    """The published UNet config with the latent ``sample_size`` and, if given, the transformer depth cap."""
    cfg = published_config(family, "unet")
    cfg["sample_size"] = sample_size
    if blocks is not None:
        cfg["transformer_layers_per_block"] = cap_blocks(cfg.get("transformer_layers_per_block", 1), blocks)
    return cfg


def vae_scale(family: str) -> int:
    return 2 ** (len(published_config(family, "vae")["block_out_channels"]) - 1)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _save_model(model, dest: Path, transformers_model: bool) -> None:
    kw = dict(max_shard_size=MAX_SHARD)
    if transformers_model:
        model.save_pretrained(str(dest), **kw)      # transformers 5 writes safetensors only
    else:
        model.save_pretrained(str(dest), safe_serialization=True, **kw)


def write_tokenizer(dest: Path, special_tokens: dict) -> int:
    """The local byte-level CLIP BPE with the published special tokens (SDXL's second tokenizer pads
    with ``!``); returns its vocabulary size. Loaded with ``from_pretrained(dir)`` (transformers 5.x)."""
    with tempfile.TemporaryDirectory(prefix="memreg_tok_") as tmp:
        write_tiny_clip_tokenizer(tmp)
        tok = CLIPTokenizer.from_pretrained(tmp, pad_token=special_tokens["pad_token"])
        tok.save_pretrained(str(dest))
        for name in ("vocab.json", "merges.txt"):   # the slow-tokenizer files, as hub checkpoints ship them
            shutil.copyfile(Path(tmp) / name, dest / name)
    return len(tok)


def _model_index(family: str) -> dict:
    index = published_config(family, "model_index")
    index["_diffusers_version"] = diffusers.__version__
    for k in UNUSED_COMPONENTS:
        if k in index:
            index[k] = [None, None]
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    return index


def build_pipeline_dir(family: str, out_dir: str | Path, *, sample_size: int, blocks: int | None = None,
                       seed: int = 0) -> Path:
    """Build ``family``'s pipeline with random weights into ``out_dir`` (absent or empty); return it.

    ``sample_size``: the UNet's latent size (images are ``8 * sample_size`` px); ``blocks``: cap on
    transformer blocks per attention (module docstring); ``seed``: component ``i`` of
    :func:`components` is initialised after ``torch.manual_seed(seed + i)``, so capping SDXL's UNet
    leaves the text encoders' weights as they were. Writes ``memreg_arch.json`` (what was built,
    parameter counts, seconds) beside the components.
    """
    check_family(family)
    if sample_size < 1:
        raise ArchError(f"sample_size must be >= 1 (the latent size), got {sample_size}")
    if blocks is not None and blocks < 1:
        raise ArchError(f"blocks must be >= 1 (transformer blocks per attention), got {blocks}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArchError(f"output dir {str(out)!r} exists and is not empty; give a new one")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    params: dict[str, int] = {}
    vocab = {}
    for i, name in enumerate(components(family)):
        dest = out / name
        torch.manual_seed(seed + i)
        if name == "unet":
            model = UNet2DConditionModel.from_config(unet_config(family, sample_size, blocks))
        elif name == "vae":
            cfg = published_config(family, "vae")
            cfg["sample_size"] = vae_scale(family) * sample_size
            model = AutoencoderKL.from_config(cfg)
        elif name.startswith("text_encoder"):
            cfg = published_config(family, name)
            cfg["torch_dtype"] = "float32"   # transformers 5 builds in the config's dtype; weights are fp32
            cls = TEXT_ENCODERS[cfg["architectures"][0]]
            model = cls(CLIPTextConfig.from_dict(cfg)).float()
        elif name.startswith("tokenizer"):
            vocab[name] = write_tokenizer(dest, published_config(family, name))
            continue
        elif name == "scheduler":
            dest.mkdir(parents=True, exist_ok=True)
            cfg = published_config(family, "scheduler")
            (dest / "scheduler_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            continue
        else:
            raise ArchError(f"{family}: no builder for component {name!r}")
        params[name] = _count(model)
        _save_model(model, dest, transformers_model=name.startswith("text_encoder"))
        del model
    (out / "model_index.json").write_text(json.dumps(_model_index(family), indent=2) + "\n")
    info = {"family": family, "sample_size": sample_size, "resolution": vae_scale(family) * sample_size,
            "blocks": blocks, "seed": seed, "config_sha256": config_digest(family), "build_version": BUILD_VERSION,
            "params": params, "tokenizer_vocab": vocab, "seconds": round(time.perf_counter() - t0, 1)}
    (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return out


def build_info(pipeline_dir: str | Path) -> dict:
    """``memreg_arch.json`` of a built pipeline dir."""
    path = Path(pipeline_dir) / INFO_NAME
    if not path.is_file():
        raise ArchError(f"{str(pipeline_dir)!r} has no {INFO_NAME} (not built by memreg.arch)")
    return json.loads(path.read_text())
