"""The demo's inference-time mitigation measurement (``memreg.mitigate``) on a fine-tuned model.

For each mode (``none``, ``wen``, ``score``) the model generates for every duplicated caption
(``images_per_caption`` seeds) and for held-out captions, with the same seeds in every mode. τ for
``wen`` and ``score`` is the ``flag_quantile`` of their criterion over *training* scene captions that
name no photo's coloured shape (the ordinary prompts; no held-out caption is used to set it).
Reported per mode: copy rate of duplicated captions (Wilson interval), fraction of duplicated /
held-out captions flagged, the share of flagged duplicated generations whose descent reached its
stop (``reached_stop``), held-out adherence, the duplicated generations' adherence to their own
caption (``dup_adherence``: what a mitigated image still shows of its prompt), and the time per
prompt (mitigation + generation) relative to an unmitigated generation.

``score`` flags at the ``flag_quantile`` and descends to the ``target_quantile`` of the same
calibration scores, with the library's descent defaults (``memreg.mitigate.DESCENT_DEFAULTS``). The
measurements behind these choices are in the README ("Generate safely").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from memreg.demo.adherence import mean_adherence
from memreg.demo.evaluate import rate
from memreg.generation import build_pipeline
from memreg.mitigate import MitigationConfig, calibrate_config, generate_mitigated

MODES = ("none", "wen", "score")


@dataclass
class MitigationEvalSettings:
    images_per_caption: int = 8        # generations per duplicated caption, per mode
    heldout_captions: int = 64
    calibration_captions: int = 128    # ordinary training scene captions that set tau and the target
    flag_quantile: float = 0.98        # tau: a prompt above it is adapted
    target_quantile: float = 0.25      # score's descent stops at or below this (wen keeps its own rule)
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0


def evaluate_mitigation(components, unet, detector, memorized: list[dict], heldout: list[dict],
                        ordinary_captions: list[str], s: MitigationEvalSettings,
                        configs: dict[str, MitigationConfig] | None = None) -> dict:
    """Per-mode numbers (see module doc) for the model ``unet``. ``configs``: name -> config to
    measure instead of the three modes at their defaults (``scripts/bench_mitigation.py`` compares
    descent settings so); unmitigated generation is measured first in any case, as the reference."""
    pipe = build_pipeline(components, unet)
    m = s.images_per_caption
    dup_prompts = [d["caption"] for d in memorized for _ in range(m)]
    dup_named = [d["named"] for d in memorized for _ in range(m)]
    held = heldout[:s.heldout_captions]
    prompts = dup_prompts + [h["caption"] for h in held]
    seeds = [s.seed + 70_000 + i for i in range(len(prompts))]
    refs = detector.embed([d["image"] for d in memorized])
    calib = ordinary_captions[:s.calibration_captions]
    if configs is None:
        configs = {mode: MitigationConfig(mode=mode) for mode in MODES if mode != "none"}
    out: dict[str, dict] = {}
    for name, given in {"none": MitigationConfig(mode="none"), **configs}.items():
        cfg = replace(given, num_inference_steps=s.num_inference_steps)
        if cfg.mode != "none":
            calibrate_config(pipe, calib, cfg, s.flag_quantile, s.target_quantile,
                             seeds=[s.seed + 90_000 + i for i in range(len(calib))])
        cfg = cfg.check()     # the descent defaults of its mode filled in
        gen = generate_mitigated(components, prompts, seeds, None, cfg, pipe=pipe, guidance_scale=s.guidance_scale,
                                 batch_size=32)
        dup_imgs, held_imgs = gen.images[:len(dup_prompts)], gen.images[len(dup_prompts):]
        sim = detector.similarity(detector.embed(dup_imgs), refs)
        own = np.array([float(sim[i, i // m]) for i in range(len(dup_imgs))])
        flags = np.array([r.flagged for r in gen.records], dtype=bool)
        reached = [r.score_after <= cfg.stop for r in gen.records[:len(dup_prompts)] if r.flagged]
        out[name] = {
            "mode": cfg.mode,
            "tau": cfg.tau,
            "target": cfg.target,
            "descent": None if cfg.mode == "none" else {"max_steps": cfg.max_steps, "lr": cfg.lr,
                                                         "stop_streak": cfg.stop_streak},
            "copy_exact": rate(own > detector.threshold),
            "dup_flagged": float(flags[:len(dup_prompts)].mean()),
            "heldout_flagged": float(flags[len(dup_prompts):].mean()),
            "reached_stop": float(np.mean(reached)) if reached else None,
            "adherence": mean_adherence(held_imgs, [h["named"] for h in held]),
            "dup_adherence": mean_adherence(dup_imgs, dup_named),
            "seconds_per_prompt": (gen.mitigation_seconds + gen.generation_seconds) / len(prompts),
        }
    for r in out.values():
        r["time_x"] = r["seconds_per_prompt"] / out["none"]["seconds_per_prompt"]
    return out


def mitigation_targets(mit: dict) -> list[tuple[str, float, bool]]:
    """Issue targets of ``score`` mitigation against unmitigated generation (a 0/0 ratio MISSes)."""
    none, sc = mit["none"], mit["score"]
    base = none["copy_exact"]["rate"]
    r = sc["copy_exact"]["rate"] / base if base else float("nan")
    adh = sc["adherence"] / none["adherence"] if none["adherence"] else float("nan")
    return [("mitigation score: duplicated copy rate <= 1/5 of unmitigated", r, r <= 0.2),
            ("mitigation score: held-out captions flagged <= 5%", sc["heldout_flagged"], sc["heldout_flagged"] <= 0.05),
            ("mitigation score: held-out adherence >= 0.98x unmitigated", adh, adh >= 0.98)]


def format_mitigation(mit: dict) -> str:
    head = f"{'mitigation':10s}  {'copy exact [95% CI]':>20s}  {'dup flagged':>11s}  {'held-out flagged':>16s}  " \
           f"{'adherence':>9s}  {'time/prompt x':>13s}"
    rows = [head]
    for mode, r in mit.items():
        lo, hi = r["copy_exact"]["ci95"]
        rows.append(f"{mode:10s}  {r['copy_exact']['rate']:>5.2f} [{lo:.2f},{hi:.2f}]{'':5s}  {r['dup_flagged']:>11.2f}  "
                    f"{r['heldout_flagged']:>16.2f}  {r['adherence']:>9.3f}  {r['time_x']:>13.2f}")
    return "\n".join(rows)
