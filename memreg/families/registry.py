"""The model families memreg knows, and which one a checkpoint or a loaded UNet is.

A new family is one module (a :class:`~memreg.families.base.ModelFamily` subclass) plus one entry
in ``FAMILIES``, checked in order: the first whose ``matches`` accepts the pipeline's
``model_index.json`` class name and the UNet/scheduler configs is the checkpoint's family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

from memreg.families.base import Components, ModelError, ModelFamily
from memreg.families.sd import SD1Family, SD2Family
from memreg.families.sdxl import SDXLFamily

FAMILIES: tuple[ModelFamily, ...] = (SDXLFamily(), SD2Family(), SD1Family())
BY_NAME: dict[str, ModelFamily] = {f.name: f for f in FAMILIES}


def family_named(name: str) -> ModelFamily:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ModelError(f"unknown model family {name!r}; choose one of {sorted(BY_NAME)}") from None


def match_family(class_name: str | None, unet_config: dict, scheduler_config: dict, where: str = "model") -> ModelFamily:
    """The first family of ``FAMILIES`` accepting these configs."""
    for fam in FAMILIES:
        if fam.matches(class_name, dict(unet_config), dict(scheduler_config)):
            return fam
    known = sorted({c for f in FAMILIES for c in f.pipeline_class_names})
    raise ModelError(f"{where}: pipeline class {class_name!r} is none of memreg's families ({', '.join(known)})")


def pipeline_class_name(model: str, revision: str | None = None) -> str | None:
    """``_class_name`` of ``model``'s model_index.json (None when it has none)."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            return None
        try:
            return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"{index}: not valid JSON ({e})") from None
    try:
        return DiffusionPipeline.load_config(model, revision=revision).get("_class_name")
    except OSError:
        return None   # a hub id not cached: loading it reports the cause


def detect_family(model: str, revision: str | None = None) -> ModelFamily:
    """The family of a diffusers pipeline dir or hub id, from its config files only (no weights)."""
    class_name = pipeline_class_name(model, revision)
    try:
        unet_cfg = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision)
    except OSError:
        unet_cfg = {}
    try:
        sched_cfg = DDPMScheduler.load_config(model, subfolder="scheduler", revision=revision)
    except OSError:
        sched_cfg = {}
    return match_family(class_name, unet_cfg, sched_cfg, where=f"model {model!r}")


def config_dict(config) -> dict:
    """A diffusers config (FrozenDict), a plain dict or an attribute namespace, as a dict."""
    if config is None:
        return {}
    return dict(config) if isinstance(config, Mapping) else dict(vars(config))


def family_of(obj, scheduler=None, prediction_type: str | None = None) -> ModelFamily:
    """The family of loaded :class:`Components` (their ``family``, else read from their configs) or
    of a UNet (with its ``scheduler`` or ``prediction_type``, which tell SD 2.x's v-prediction)."""
    if isinstance(obj, Components):
        if obj.family is not None:
            return obj.family
        obj, scheduler = obj.unet, obj.scheduler
    sched_cfg = config_dict(getattr(scheduler, "config", None))
    if prediction_type is not None:
        sched_cfg["prediction_type"] = prediction_type
    return match_family(None, config_dict(getattr(obj, "config", None)), sched_cfg, where="UNet")


def prompt_encoder(components: Components, device=None, image_size: int | None = None):
    """The family's prompt encoder over ``components`` (``image_size``: pixels of the samples it
    conditions; default the UNet's default sample)."""
    return family_of(components).prompt_encoder(components, device=device, image_size=image_size)


def pipeline_components(pipe) -> Components:
    """The :class:`~memreg.families.Components` of a loaded diffusers pipeline (its own modules, no
    copies), so the family seam (``prompt_encoder``) serves a pipeline as it serves a checkpoint;
    SDXL's ``force_zeros_for_empty_prompt`` is read from the pipeline's config."""
    force = getattr(pipe.config, "force_zeros_for_empty_prompt", None)
    return Components(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler,
                      getattr(pipe, "name_or_path", "") or "", tokenizer_2=getattr(pipe, "tokenizer_2", None),
                      text_encoder_2=getattr(pipe, "text_encoder_2", None), family=family_of(pipe.unet, pipe.scheduler),
                      vae_scale_factor=pipe.vae_scale_factor,
                      pipeline_config=None if force is None else {"force_zeros_for_empty_prompt": bool(force)})
