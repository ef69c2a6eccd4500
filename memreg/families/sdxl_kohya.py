"""SDXL UNet module names as kohya's sd-scripts, A1111 and ComfyUI write them: the original
(LDM/SGM) UNet's, not diffusers'.

kohya trains SDXL on its own copy of the SGM UNet (``input_blocks`` / ``middle_block`` /
``output_blocks``), so its LoRA files name modules ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``
where diffusers says ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``; A1111 and ComfyUI
key SDXL LoRAs the same way. (For SD 1.x/2.x kohya uses a diffusers-layout UNet, so those files keep
diffusers' ``down_blocks_*`` names and need none of this.)

The SGM layout follows from the UNet config, so any SDXL-style config maps, not only the published one:

* ``input_blocks.0.0`` is ``conv_in``; then, level by level, one input block per layer
  (``.0`` the resnet, ``.1`` the attention, if the level has one), then the level's downsampler as an
  input block of its own (``.0.op``) unless it is the last level;
* ``middle_block``: resnet, attention, resnet, ... (``resnets.j`` -> ``2j``, ``attentions.j`` -> ``2j + 1``;
  ``j`` without attention);
* ``output_blocks``: one per up-block layer (``layers_per_block + 1`` a level, deepest level first),
  ``.0`` the resnet, ``.1`` the attention, and the upsampler after them in the level's last layer
  (``.2.conv`` with an attention, ``.1.conv`` without) unless it is the last level;
* inside a resnet ``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut`` are ``in_layers.0,
  in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection``; inside an attention the
  names are the same in both; ``time_embedding.linear_1/2``, ``add_embedding.linear_1/2``,
  ``conv_norm_out``, ``conv_out`` are ``time_embed.0/2``, ``label_emb.0.0/0.2``, ``out.0``, ``out.2``.

A module this layout cannot name is an error naming the key, not a key passed through: a file with
both namings is one that diffusers' loader silently drops the SGM-named half of.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping

from memreg.families.base import ModelError

KOHYA_UNET_PREFIX = "lora_unet_"

DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}   # block type -> has attentions
UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_TYPES = {"UNetMidBlock2DCrossAttn": True, "UNetMidBlock2D": False}

RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _block_types(types, table: Mapping[str, bool], what: str) -> tuple[bool, ...]:
    unknown = [t for t in types if t not in table]
    if unknown:
        raise ModelError(f"UNet config: {what} {unknown[0]!r} has no SGM (kohya SDXL) layout; "
                         f"known: {', '.join(table)}")
    return tuple(table[t] for t in types)


@lru_cache(maxsize=16)
def _layout(down_types: tuple, up_types: tuple, mid_type, layers: tuple) -> dict:
    """(diffusers block path, e.g. ``down_blocks.1.attentions.0``) -> SGM block path, for one config."""
    down_attn = _block_types(down_types, DOWN_TYPES, "down block type")
    up_attn = _block_types(up_types, UP_TYPES, "up block type")
    levels = len(down_attn)
    if len(up_attn) != levels or len(layers) != levels:
        raise ModelError(f"UNet config: {levels} down blocks, {len(up_attn)} up blocks and "
                         f"{len(layers)} layers_per_block entries do not describe one UNet")
    paths: dict[str, str] = {}
    block = 1
    for b, attn in enumerate(down_attn):
        for j in range(layers[b]):
            paths[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{block}.0"
            if attn:
                paths[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{block}.1"
            block += 1
        if b < levels - 1:
            paths[f"down_blocks.{b}.downsamplers.0"] = f"input_blocks.{block}.0"
            block += 1
    if mid_type is not None:
        mid_attn = _block_types((mid_type,), MID_TYPES, "mid block type")[0]
        for j in range(2):   # UNetMidBlock2D(CrossAttn) at diffusers' default num_layers=1: 2 resnets
            paths[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j if mid_attn else j}"
        if mid_attn:
            paths["mid_block.attentions.0"] = "middle_block.1"
    block = 0
    for i, attn in enumerate(up_attn):
        n = layers[levels - 1 - i] + 1
        for j in range(n):
            paths[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{block}.0"
            if attn:
                paths[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{block}.1"
            if j == n - 1 and i < levels - 1:
                paths[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{block}.{2 if attn else 1}"
            block += 1
    return paths


def layout_of(unet_config: Any) -> dict[str, str]:
    """Diffusers block paths (``down_blocks.1.attentions.0``, ``up_blocks.0.upsamplers.0``, ...) ->
    SGM block paths (``input_blocks.4.1``, ``output_blocks.2.2``) of a UNet config (a dict, a
    diffusers ``FrozenDict`` or a model with ``.config``)."""
    cfg = getattr(unet_config, "config", unet_config)
    down = tuple(cfg["down_block_types"])
    lpb = cfg["layers_per_block"]
    layers = tuple(int(n) for n in lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * len(down)
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return dict(_layout(down, tuple(cfg["up_block_types"]), mid, layers))


_BLOCK = re.compile(r"(down_blocks\.\d+\.(?:resnets|attentions|downsamplers)\.\d+"
                    r"|up_blocks\.\d+\.(?:resnets|attentions|upsamplers)\.\d+"
                    r"|mid_block\.(?:resnets|attentions)\.\d+)(?:\.(.+))?")


def sgm_module_name(name: str, unet_config: Any) -> str:
    """A diffusers SDXL UNet module name (dotted: ``down_blocks.1.resnets.0.conv1``) as the SGM
    UNet names it (``input_blocks.4.0.in_layers.2``); see the module docstring for the rules."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    m = _BLOCK.fullmatch(name)
    paths = layout_of(unet_config) if m else {}
    if not m or m.group(1) not in paths:
        raise ModelError(f"UNet module {name!r} has no name in the SGM (kohya SDXL) UNet of this config")
    block, part = m.group(1), m.group(2) or ""
    kind = block.split(".")[-2]
    if kind == "resnets" and part in RESNET_PARTS:
        part = RESNET_PARTS[part]
    elif kind in ("downsamplers", "upsamplers") and part == "conv":
        part = "op" if kind == "downsamplers" else "conv"
    elif kind != "attentions" or not part:
        raise ModelError(f"UNet module {name!r} has no name in the SGM (kohya SDXL) UNet of this config")
    return f"{paths[block]}.{part}"


# kohya names join module paths with "_", which is ambiguous inside names (to_out_0, time_emb_proj):
# read back only the block structure, whose shape is fixed, and the names the rules above list.
_KOHYA_BLOCK = re.compile(r"(?P<block>(?:down|up)_blocks_\d+|mid_block)_(?P<kind>resnets|attentions|downsamplers|upsamplers)"
                          r"_(?P<idx>\d+)(?:_(?P<part>.+))?")
_KOHYA_TOP = {k.replace(".", "_"): k for k in TOP_LEVEL}


def sgm_kohya_key(key: str, unet_config: Any) -> str:
    """A kohya key with diffusers' module names (``lora_unet_down_blocks_1_attentions_0_..._to_q.lora_down.weight``,
    as diffusers' ``convert_state_dict_to_kohya`` writes them) with the SGM UNet's names instead
    (``lora_unet_input_blocks_4_1_..._to_q.lora_down.weight``); keys of the text encoders
    (``lora_te1_``/``lora_te2_``) unchanged."""
    if not key.startswith(KOHYA_UNET_PREFIX):
        return key
    module, dot, rest = key[len(KOHYA_UNET_PREFIX):].partition(".")
    m = _KOHYA_BLOCK.fullmatch(module)
    if module in _KOHYA_TOP:
        dotted = _KOHYA_TOP[module]
    elif m:   # the part inside the block keeps its "_": attention parts pass through, resnet parts are listed so
        dotted = f"{m['block'].replace('blocks_', 'blocks.')}.{m['kind']}.{m['idx']}" + (f".{m['part']}" if m["part"] else "")
    else:
        raise ModelError(f"kohya key {key!r}: UNet module {module!r} has no name in the SGM (kohya SDXL) UNet")
    try:
        sgm = sgm_module_name(dotted, unet_config)
    except ModelError as e:
        raise ModelError(f"kohya key {key!r}: {e}") from None
    return KOHYA_UNET_PREFIX + sgm.replace(".", "_") + dot + rest
