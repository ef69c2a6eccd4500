"""The attack from Python: load a model (pipeline dir, or base + LoRA), attack targets, summarise.

::

    from memreg.attack import AttackSettings, attack_targets, load_pipeline, summarize
    from memreg.copy_detect import build_copy_detector
    pipe = load_pipeline("out/model")                        # or load_pipeline(base, lora="out/lora_run")
    records, images = attack_targets(pipe, build_copy_detector("ssim"), trained + control, AttackSettings())
    report = summarize(records, AttackSettings())            # rates with Wilson intervals, trained vs control

Targets come from :func:`memreg.attack.targets.select_trained` / ``select_control`` (or are built
by hand as :class:`memreg.attack.targets.Target`). The model is any family of ``memreg.families``
(SD 1.x, 2.x, SDXL): its own pipeline class, prompt encoder and conditioning.
"""

from __future__ import annotations

from pathlib import Path

from memreg.attack.inputs import AttackInputError
from memreg.attack.outputs import build_report
from memreg.attack.runner import AttackSettings, Attacker, freeze_pipeline
from memreg.attack.targets import Target
from memreg.generation import build_pipeline, load_lora_fused
from memreg.models import LORA_WEIGHT_NAME, load_components



def check_lora(lora: str | None) -> None:
    """A LoRA dir must hold diffusers' safetensors file (what memreg's trainer writes)."""
    if lora is None:
        return
    p = Path(lora)
    if not p.is_dir():
        raise AttackInputError(f"--lora {lora!r}: no such directory")
    if not (p / LORA_WEIGHT_NAME).is_file():
        raise AttackInputError(f"{p / LORA_WEIGHT_NAME}: missing (--lora must be a LoRA output dir)")


def load_pipeline(model: str, lora: str | None = None, device="cpu", dtype="float32"):
    """The family's DDIM pipeline of ``model`` (safetensors via ``from_pretrained``), ``lora`` loaded
    on top; every module frozen and in eval mode."""
    comps = load_components(model, dtype=dtype, device=device)
    pipe = build_pipeline(comps)
    if lora is not None:
        load_lora_fused(pipe, lora)
    freeze_pipeline(pipe)
    return pipe


def attack_targets(pipe, detector, targets: list[Target], settings: AttackSettings,
                   progress=None) -> tuple[list[dict], list]:
    """(one record per target, its best reproduction or None), in the targets' order."""
    attacker = Attacker(pipe, detector, settings)
    records, images = [], []
    for t in targets:
        rec, img = attacker.attack(t)
        records.append(rec)
        images.append(img)
        if progress is not None:
            progress.update(1)
    return records, images


def summarize(records: list[dict], settings: AttackSettings, detector=None, **meta) -> dict:
    """attack.json's dict for ``records`` (rates per attack, trained vs control, seconds per target)."""
    det = {"name": getattr(detector, "name", None), "threshold": getattr(detector, "threshold", None)}
    return build_report(records, {"settings": settings.to_dict(), "detector": det, **meta}, complete=True)
