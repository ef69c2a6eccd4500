"""``make demo``: memorization appears, is detected, and the guard prevents it, side by side.

1. The offline dataset (:mod:`memreg.demo.data`) and a base model are built once and cached, keyed
   by their settings: a tiny SD pipeline whose VAE is trained on the demo images
   (:mod:`memreg.demo.vae`), then pre-trained (UNet + text encoder, full fine-tuning) on generic
   procedural scenes only, so the demo fine-tunes a model that already works, as real users do.
2. From that base, with the same data, seed and steps, one fine-tune per entry of ``runs:``
   through :func:`memreg.training.loop.train`, with the periodic memorization monitor on
   (TensorBoard logs under ``runs/<name>``): full fine-tuning of the UNet (``none``, the guard
   ``penalty``, the strongest baseline ``wen_filter``; any guard of the registry can be a run) and
   LoRA rows (``lora_none``, ``lora_penalty``); then on ``none`` inference-time mitigation
   (:mod:`memreg.demo.mitigation`) and, on the runs of ``attack.runs``, the extraction attack
   (:mod:`memreg.demo.attack`). ``workers: n`` runs n tasks at once (:func:`run_all`).
3. With a ``web:`` section, the same for the web world (:mod:`memreg.demo.data`: each photo under
   several wordings and near-duplicate copies, unseen wordings asked at evaluation), from the same
   base model, its runs in the same worker pool, written under ``out/web/`` (:func:`world_settings`).
4. Each fine-tuned model is measured (:mod:`memreg.demo.evaluate`); targets are computed per world
   (:func:`targets`), a table is printed, and ``results.json``, ``tradeoff.png`` per world
   (:mod:`memreg.demo.tradeoff`) and ``report.html`` (``memreg report``, the trade-off plots on top)
   are written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from memreg import log_tags as tags
from memreg.copy_detect import build_copy_detector
from memreg.demo.attack import AttackEvalSettings, attack_targets_of, evaluate_attack, format_attack
from memreg.demo.data import (HELDOUT_GENERATOR, WEB_GENERATOR, DemoDataConfig, build_demo_dataset, photo_shapes_of,
                              pretrain_rows, shapes_named)
from memreg.demo.evaluate import FinalEvalSettings, base_adherence, evaluate_model, training_wordings
from memreg.demo.mitigation import MitigationEvalSettings, evaluate_mitigation, format_mitigation, mitigation_targets
from memreg.demo.tradeoff import plot_tradeoff
from memreg.demo.vae import train_vae
from memreg.detect import fit_weights
from memreg.generation import build_pipeline, load_lora_fused
from memreg.metrics import auroc
from memreg.guards import GUARDS, guard_spec
from memreg.guards.anisotropy_gate.config import AnisotropyGateConfig
from memreg.models import load_components
from memreg.report import build_report, load_run, run_colors
from memreg.testing import build_tiny_sd
from memreg.training.config import load_config, load_yaml
from memreg.training.loop import train

logger = logging.getLogger("memreg.demo")
BASELINES = ("wen_filter", "caption_noise", "agc")   # the guards a demo run may compare the guard with
# What each world's two copy rates ask with (results' copy_exact, copy_paraphrase).
COPY_LABELS = {"studio": ("exact", "paraphrased"), "web": ("training wordings", "unseen wordings")}
# The world check "a plain fine-tune memorizes": its copy rate on the photos' (training) wordings at least
# this. The web world's copies spread over four wordings and near-duplicates, so each wording is
# reproduced less often (README: the web world).
MEMORIZES = {"studio": {"none": 0.5, "lora_none": 0.3}, "web": {"none": 0.3, "lora_none": 0.2}}
SECTIONS = {"cache_dir", "workers", "data", "base", "finetune", "runs", "final", "mitigation", "attack", "web",
            "studies"}
WEB_SECTIONS = {"data", "finetune", "runs"}   # what the web world changes; everything else is the first world's
WORLDS = ("studio", "web")                    # the first world (one caption, exact copies) and the web world


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_settings(path: str | Path, quick: bool = False) -> dict:
    """The demo YAML; ``quick`` merges its ``quick:`` section (toy sizes for smoke tests)."""
    settings = load_yaml(Path(path).read_text())
    quick_over = settings.pop("quick", {}) or {}
    if quick:
        for section, values in quick_over.items():
            if isinstance(values, dict):
                settings.setdefault(section, {}).update(values)
            else:
                settings[section] = values
        for run in (settings.get("runs") or {}).values():  # quick sizes win over a run's own
            for key in quick_over.get("finetune", {}):
                (run or {}).pop(key, None)
    unknown = set(settings) - SECTIONS
    if unknown:
        raise ValueError(f"{path}: unknown demo section(s) {sorted(unknown)}")
    for section, known in (("final", FinalEvalSettings), ("mitigation", MitigationEvalSettings),
                           ("attack", AttackEvalSettings)):
        _check_section(path, settings, section, known)
    if settings.get("web") is not None:
        unknown = set(settings["web"]) - WEB_SECTIONS
        if unknown:
            raise ValueError(f"{path}: unknown web: section(s) {sorted(unknown)}; it takes {sorted(WEB_SECTIONS)}")
        web = world_settings(settings, "web")
        for name in web["runs"]:
            run_overrides(web, name)
    workers = settings.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{path}: workers must be an integer >= 1, got {workers!r}")
    for name in settings.get("runs") or {}:
        run_overrides(settings, name)  # every run's guard is named before anything is built
    _check_section(path, settings, "base", BaseModelSettings)
    return settings


def _check_section(path: str | Path, settings: dict, section: str, known: type) -> None:
    """``settings[section]`` (an empty mapping when absent) holds only ``known``'s fields and every one
    of them without a default; otherwise a ValueError naming the file, the section and the keys."""
    value = settings.setdefault(section, {})
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {section}: must be a mapping of its keys, got {value!r}")
    unknown = set(value) - {f.name for f in fields(known)}
    missing = {f.name for f in fields(known) if f.default is MISSING and f.default_factory is MISSING} - set(value)
    if missing:
        raise ValueError(f"{path}: {section}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    if unknown:
        raise ValueError(f"{path}: unknown {section}: key(s) {sorted(unknown)}")


def world_settings(settings: dict, world: str) -> dict:
    """The settings of ``world``: the file's own for ``studio``; for ``web`` its ``web:`` section over
    them (``data`` and ``finetune`` keys merged, ``runs`` replaced); neither the attack nor the
    mitigation runs there (they are measured in the first world)."""
    if world == "studio":
        return settings
    web = settings["web"] or {}
    out = copy.deepcopy(settings)
    out.pop("web")
    out["data"] = {**out["data"], **web.get("data", {})}
    out["data"].setdefault("web", {})
    out["finetune"] = {**(out.get("finetune") or {}), **(web.get("finetune") or {})}
    out["runs"] = copy.deepcopy(web.get("runs") or {})
    out["attack"] = {**out["attack"], "runs": []}
    out["mitigation"] = None
    return out


STUDY_SUFFIX = re.compile(r"@[^@]+$")   # a study run's name: its guarded run's, then @<value>
STUDY_KEYS = ("guard.weight", "guard.term")   # what a study may vary (memreg.demo.run.study_settings)


def study_settings(settings: dict, study: str) -> dict:
    """``--study NAME`` (``studies.NAME: {key, values, runs}`` in the config): every guarded run of each
    world (the anisotropy gate; ``runs``: only those named) again at each value of one guard key, as
    ``<name>@<value>``, beside the plain runs they are compared with; baselines, the attack and the
    mitigation are left out."""
    spec = (settings.get("studies") or {}).get(study)
    if not spec or spec.get("key") not in STUDY_KEYS or not spec.get("values"):
        raise ValueError(f"--study {study}: the demo config needs studies: {{{study}: {{key: one of "
                         f"{list(STUDY_KEYS)}, values: [...]}}}} (it has {sorted(settings.get('studies') or {})})")
    key, only = spec["key"], spec.get("runs")
    cast = float if key == "guard.weight" else str
    out = copy.deepcopy(settings)
    overs = {n: run_overrides(settings, n) for n in settings["runs"]}
    guarded = [n for n, o in overs.items()
               if guard_spec(o["guard.type"]).name == "anisotropy_gate" and (only is None or n in only)]
    plains = {plain_run_of({n: {"mode": o.get("mode", "lora")} for n, o in overs.items()}, n) for n in guarded}
    runs = {}
    for name, run in settings["runs"].items():
        if name in plains or name in guarded:
            runs[name] = run
        if name in guarded:
            for v in spec["values"]:
                runs[f"{name}@{cast(v):g}" if cast is float else f"{name}@{v}"] = {
                    **(run or {}), "guard.type": overs[name]["guard.type"], key: cast(v)}
    out["runs"] = runs
    out["attack"] = {**out["attack"], "runs": []}
    out["mitigation"] = None
    if out.get("web") is not None:
        out["web"] = dict(out["web"], runs=study_settings(world_settings(settings, "web"), study)["runs"])
    return out


def worlds_of(settings: dict) -> list[str]:
    """The worlds a demo config runs: the first, and the web world when it has a ``web:`` section."""
    return [w for w in WORLDS if w == "studio" or settings.get("web") is not None]


def _data_fields(cfg: DemoDataConfig) -> dict:
    """The data config's cache key fields: the held-out generator's version, and ``web`` with the web
    generator's version only when set."""
    fields_ = dict(asdict(cfg), heldout_generator=HELDOUT_GENERATOR)
    if fields_.get("web") is None:
        fields_.pop("web", None)
    else:
        fields_["web_generator"] = WEB_GENERATOR
    return fields_


def prepare_data(settings: dict, cache: Path) -> Path:
    cfg = DemoDataConfig(**settings["data"])
    root = cache / f"data-{_key(_data_fields(cfg))}"
    if not (root / "manifest.json").is_file():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_dataset(tmp, cfg)
        tmp.rename(root)
        logger.info("demo data written to %s", root)
    write_memorized_prompts(root)
    return root


def _pretrain_folder(root: Path, data_cfg: DemoDataConfig, n: int) -> Path:
    """Scenes of the demo world (other draws, no photos): the base model's pre-training data."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.jsonl").open("w") as f:
        for img, meta in pretrain_rows(n, data_cfg):
            img.save(root / meta["file_name"])
            f.write(json.dumps({"file_name": meta["file_name"], "caption": meta["caption"]}) + "\n")
    return root


@dataclass
class BaseModelSettings:
    """``base:``, every key required: the tiny SD that both worlds fine-tune (:func:`prepare_base`)."""
    seed: int
    vae_downsample: bool          # the VAE halves the image side: latents at resolution // 2
    unet_channels: list[int]
    attention_levels: int
    cross_attention_dim: int
    vae_steps: int
    pretrain_images: int
    steps: int
    batch_size: int
    learning_rate: float
    proportion_empty_prompts: float


def prepare_base(settings: dict, cache: Path) -> Path:
    """Build (or reuse) the base model: tiny SD + trained VAE + generic pre-training. Both worlds share
    it: it is keyed by, and its VAE trained on, the first world's data (:meth:`DemoDataConfig.base_world`)."""
    b = BaseModelSettings(**settings["base"])
    data_cfg = DemoDataConfig(**settings["data"]).base_world()
    root = cache / f"base-{_key(_data_fields(data_cfg), settings['base'])}"
    if (root / "model_index.json").is_file():
        logger.info("base model: cached at %s", root)
        return root
    work = root.with_name(root.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    data_root = prepare_data({"data": asdict(data_cfg)}, cache)
    init = build_tiny_sd(work / "init", sample_size=data_cfg.resolution // (2 if b.vae_downsample else 1),
                         unet_channels=tuple(b.unet_channels), vae_downsample=b.vae_downsample,
                         cross_attention_dim=b.cross_attention_dim, attention_levels=b.attention_levels,
                         seed=b.seed)
    pre = _pretrain_folder(work / "pretrain", data_cfg, b.pretrain_images)
    rows = [json.loads(x) for x in (data_root / "train" / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(data_root / "train" / r["file_name"]).convert("RGB") for r in rows]
    images += [Image.open(p).convert("RGB") for p in sorted(pre.glob("*.png"))[:len(images)]]
    vae = AutoencoderKL.from_pretrained(init, subfolder="vae")
    vae_stats = train_vae(vae, images, steps=b.vae_steps, seed=b.seed)
    vae.save_pretrained(init / "vae", safe_serialization=True)
    logger.info("base model: VAE trained (%s)", vae_stats)
    cfg = load_config([], overrides={
        "pretrained_model_name_or_path": str(init), "train_data_dir": str(pre), "caption_column": "caption",
        "mode": "full", "train_text_encoder": True, "resolution": data_cfg.resolution, "center_crop": True,
        "train_batch_size": b.batch_size, "learning_rate": b.learning_rate, "lr_scheduler": "cosine",
        "lr_warmup_steps": 50, "max_train_steps": b.steps, "seed": b.seed, "cache_latents": True,
        "proportion_empty_prompts": b.proportion_empty_prompts, "output_dir": str(work / "model"),
        "checkpointing_steps": 10 ** 9, "report_to": "none"})
    train(cfg)
    (work / "model" / "base_info.json").write_text(json.dumps(
        {"vae": vae_stats, "seconds": time.perf_counter() - t0, "settings": settings["base"]}, indent=2))
    (work / "model").rename(root)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("base model: built in %.0fs at %s", time.perf_counter() - t0, root)
    return root


def run_overrides(settings: dict, name: str) -> dict:
    """The train/train.py keys of run ``name``: ``finetune:`` updated by ``runs.<name>``; the guard
    defaults to the run's name."""
    over = copy.deepcopy(settings.get("finetune") or {})
    over.update(settings["runs"][name] or {})
    over.setdefault("guard.type", name)
    try:
        guard_spec(over["guard.type"])
    except ValueError:
        raise ValueError(f"run {name!r}: unknown guard {over['guard.type']!r}; choose from {list(GUARDS)}") from None
    return over


MEMORIZED_PROMPTS = "memorized_prompts.txt"   # beside the data's manifest (prepare_data)


def write_memorized_prompts(data_root: Path) -> Path:
    """Every training wording of every memorized photo (the manifest's ground truth), one a line, for
    the monitor's ``memorized`` group: the world check's positives, whatever the item index joins.
    Derived from the manifest, so it is written (atomically) wherever it is missing."""
    path = data_root / MEMORIZED_PROMPTS
    if not path.is_file():
        manifest = json.loads((data_root / "manifest.json").read_text())
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(w + "\n" for m in manifest["memorized"] for w in training_wordings(m)))
        tmp.rename(path)
    return path


def finetune(settings: dict, name: str, base: Path, data_root: Path, run_dir: Path):
    over = run_overrides(settings, name)
    over.update({"pretrained_model_name_or_path": str(base), "train_data_dir": str(data_root / "train"),
                 "output_dir": str(run_dir), "eval.heldout_prompts": str(data_root / "heldout" / "metadata.jsonl"),
                 "eval.memorized_prompts": str(data_root / MEMORIZED_PROMPTS),
                 "resolution": settings["data"]["resolution"]})
    cfg = load_config([], overrides=over)
    t0 = time.perf_counter()
    result = train(cfg)
    return result, time.perf_counter() - t0


def _heldout_norm(run: dict) -> float:
    """Mean guidance norm of held-out captions at the monitor's last eval (nan without one)."""
    g = run["detection"].get("groups_end", {}).get("heldout")
    return g["norm"]["mean"] if g else float("nan")


def _penalty_weight(over: dict) -> float | None:
    """The penalty weight of a run (its override or the guard's default); None for other guards."""
    if guard_spec(over["guard.type"]).name != "anisotropy_gate":
        return None
    return float(over.get("guard.weight", AnisotropyGateConfig.weight))


def _mean_step_time(result) -> float:
    """Mean optimizer-step time after the first step: a mean, not a median, so the penalty's
    probe steps (every n-th step) count in full."""
    times = [x[tags.PERF_STEP_TIME] for x in result.logs[1:] if tags.PERF_STEP_TIME in x]
    return float(np.mean(times)) if times else float("nan")


def _group_stats(groups: dict) -> dict:
    """Per group and term: mean and 10/50/90th percentiles of the monitor's per-caption values."""
    out = {}
    for g, rows in groups.items():
        if rows:
            out[g] = {t: {"mean": float(np.mean([r[t] for r in rows])),
                          **{f"p{q}": float(np.percentile([r[t] for r in rows], q)) for q in (10, 50, 90)}}
                      for t in ("norm", "align", "score")}
    return out


def final_detection(run_dir: Path) -> dict:
    """At the monitor's last detection eval, the world check: AUC of the memorized photos' training
    wordings (the ``memorized`` group, :func:`write_memorized_prompts`) against held-out captions, for
    norm, align and the paper's combined score (SD1 weights), and a combined score with g1/g2 fitted
    by cross-validated logistic regression (out-of-fold AUC; ``memreg detect --fit-weights``); the
    same AUCs for the monitor's ``duplicated`` group (captions of the item index's repeated items:
    what the product found, ``duplicated_auc``); the per-group distributions at the first eval (the
    base model) and the last."""
    files = sorted((run_dir / "memorization").glob("eval_step*.json"),
                   key=lambda p: int(p.stem.removeprefix("eval_step")))
    if not files:
        return {}
    first, last = (json.loads(f.read_text()) for f in (files[0], files[-1]))
    groups = last["groups"]
    positives = "memorized" if groups.get("memorized") else "duplicated"
    rows = [(r, 1) for r in groups.get(positives, [])] + [(r, 0) for r in groups.get("heldout", [])]
    ok = len({y for _, y in rows}) == 2
    out = {t: auroc([y for _, y in rows], [r[t] for r, _ in rows]) if ok else None for t in ("norm", "align", "score")}
    out["positives"] = positives
    out["duplicated_auc"] = {t: last["scalars"].get(tags.eval_auc("duplicated_vs_heldout", t))
                             for t in ("norm", "align", "score")}
    if rows:
        fit = fit_weights([r["norm"] for r, _ in rows], [r["align"] for r, _ in rows], [y for _, y in rows])
        if "out_of_fold" in fit:
            out["score_fitted_oof"] = fit["out_of_fold"]["auc"]
            out["fitted_g1_g2"] = [fit["g1"], fit["g2"]]
    out["groups_start"] = _group_stats(first["groups"])
    out["groups_end"] = _group_stats(last["groups"])
    return out


def load_run_model(base: Path, run_dir: Path):
    """The components of a demo run's saved model: a full fine-tune's own pipeline, or the base
    with the run's LoRA merged in."""
    if (run_dir / "unet").is_dir():
        comps = load_components(str(run_dir))
    else:
        comps = load_components(str(base))
        load_lora_fused(build_pipeline(comps), str(run_dir))
    return comps


def ratio(a: float, b: float) -> float:
    """a / b, undefined (nan) when b is 0: a check on a ratio with nothing to compare then MISSes,
    the same verdict for every ratio check (in ``--quick`` runs too)."""
    return a / b if b else float("nan")


def plain_run_of(runs: dict, name: str) -> str:
    """The unguarded run that run ``name`` is compared with: ``<guard>_<suffix>`` (``penalty_augment``)
    with ``none_<suffix>`` when the world has it, other LoRA runs with ``lora_none``, the rest with
    ``none``; an unguarded run with itself."""
    if name in ("none", "lora_none") or name.startswith("none_"):
        return name
    head, _, suffix = STUDY_SUFFIX.sub("", name).partition("_")
    if head != "lora" and suffix and f"none_{suffix}" in runs:
        return f"none_{suffix}"
    return "lora_none" if runs[name]["mode"] == "lora" and "lora_none" in runs else "none"


def dominates(a: dict, b: dict) -> bool:
    """Run ``a`` is at least as good as ``b`` on exact copy rate, held-out loss and adherence, and better on one."""
    ka = (a["copy_exact"]["rate"], a["heldout_loss"], -a["adherence"])
    kb = (b["copy_exact"]["rate"], b["heldout_loss"], -b["adherence"])
    return all(x <= y for x, y in zip(ka, kb)) and any(x < y for x, y in zip(ka, kb))


def _guard_targets(runs: dict, plain: str, guarded: str, baselines: list[str], labels: tuple[str, str],
                   prefix: str) -> list[tuple]:
    """The guard's targets (five-fold, selectively): ``guarded`` against ``plain``; ``labels`` name the
    two copy rates (the web world's are training and unseen wordings)."""
    p, g = runs[plain], runs[guarded]
    rows = []
    for key, label in zip(("copy_exact", "copy_paraphrase"), labels):
        r = ratio(g[key]["rate"], p[key]["rate"])
        rows.append((f"{prefix}{guarded} copy rate ({label}) <= 1/5 of {plain}'s", r, r <= 0.2))
    r = ratio(g["heldout_loss"], p["heldout_loss"])
    rows.append((f"{prefix}{guarded} held-out loss <= 1.05x {plain}'s", r, r <= 1.05))
    r = ratio(g["adherence"], p["adherence"])
    rows.append((f"{prefix}{guarded} adherence >= 0.95x {plain}'s", r, r >= 0.95))
    rows.append((f"{prefix}{guarded} step time <= 1.3x {plain}'s", g["step_time_ratio"], g["step_time_ratio"] <= 1.3))
    for b in baselines:
        dom = dominates(runs[b], g)
        rows.append((f"{prefix}{b} does not dominate {guarded} (copy, loss, adherence; 1 = dominates)", float(dom),
                     not dom))
    return rows


def _world_targets(runs: dict, detection: dict, world: str) -> list[tuple]:
    """A world's own checks (``none`` memorizes, the paper's detector separates, the base follows
    held-out captions) and the guard's targets for every guarded run of it against its plain run."""
    prefix, labels = ("" if world == "studio" else f"{world}: "), COPY_LABELS[world]
    rows = []
    for name, floor in MEMORIZES[world].items():
        if name in runs:
            v = runs[name]["copy_exact"]["rate"]
            rows.append((f"{prefix}{name} memorizes: copy rate ({labels[0]}) >= {floor}", v, v >= floor))
    if "none" in runs:   # a study of LoRA runs alone has no full plain run to check
        auc = detection.get("score")
        auc = float("nan") if auc is None else auc
        rows.append((f"{prefix}detection at the end of none, paper's SD1 score (g1=1, g2=2), AUC memorized vs "
                     "held-out >= 0.95", auc, auc >= 0.95))
        v = runs["none"].get("base_adherence", {}).get("adherence", float("nan"))
        rows.append((f"{prefix}the base follows held-out captions: adherence >= 0.8", v, v >= 0.8))
    baselines = [b for b in BASELINES if b in runs]
    for name, r in runs.items():
        if r["guard"] == "anisotropy_gate" and (r.get("weight") or 0) == 0:
            plain = plain_run_of(runs, name)
            rows += _guard_targets(runs, plain, name, baselines if plain == "none" else [], labels, prefix)
    return rows


def curve_targets(runs: dict, world: str) -> list[tuple]:
    """The penalty's trade-off curve (``--study`` over ``guard.weight``): each guarded run at every weight against
    its plain run, held-out loss <= 1.10x and adherence >= 0.90x; along the weights of one guarded
    run, each copy rate no higher than the upper end of the previous weight's 95% interval."""
    prefix, labels = ("" if world == "studio" else f"{world}: "), COPY_LABELS[world]
    families: dict[str, list[tuple[float, str]]] = {}
    for name, r in runs.items():
        if r["guard"] == "anisotropy_gate":
            families.setdefault(STUDY_SUFFIX.sub("", name), []).append((r.get("weight") or 0.0, name))
    rows = []
    for family, members in families.items():
        members.sort()
        plain = plain_run_of(runs, family)
        for w, name in members:
            g, p = runs[name], runs[plain]
            r = ratio(g["heldout_loss"], p["heldout_loss"])
            rows.append((f"{prefix}{name} (weight {w:g}) held-out loss <= 1.10x {plain}'s", r, r <= 1.10))
            r = ratio(g["adherence"], p["adherence"])
            rows.append((f"{prefix}{name} (weight {w:g}) adherence >= 0.90x {plain}'s", r, r >= 0.90))
        for (_, a), (w, b) in zip(members, members[1:]):
            for key, label in zip(("copy_exact", "copy_paraphrase"), labels):
                hi, v = runs[a][key]["ci95"][1], runs[b][key]["rate"]
                rows.append((f"{prefix}{b} copy rate ({label}) <= upper 95% bound of {a}'s ({hi:.2f})", v, v <= hi))
    return rows


def targets(results: dict) -> list[dict]:
    """The demo's targets, each computed from ``results`` (never hard-coded outcomes)."""
    runs = results["runs"]
    rows = _world_targets(runs, results["detection_none"], "studio") if runs else []
    if results.get("web"):
        rows += _world_targets(results["web"]["runs"], results["web"]["detection_none"], "web")
    study = ((results.get("settings") or {}).get("studies") or {}).get(results.get("study") or "")
    if study and study["key"] == "guard.weight":
        rows += curve_targets(runs, "studio") if runs else []
        rows += curve_targets(results["web"]["runs"], "web") if results.get("web") else []
    if results.get("mitigation_none"):
        rows += mitigation_targets(results["mitigation_none"])
    rows += attack_targets_of(runs)
    if not results.get("study"):   # a study is not the demo: its wall time answers nothing
        rows.append(("make demo wall time <= 25 min", results["wall_s"] / 60, results["wall_s"] <= 25 * 60))
    return [{"target": t, "value": float(v), "pass": bool(ok)} for t, v, ok in rows]


def _fmt_rate(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['rate']:.2f} [{lo:.2f},{hi:.2f}]"


def _group_rates(report: dict, kind: str) -> str:
    """``duplicated/ordinary`` of a guard's run totals (``fire_rate``, ``gate_rate``); ``-`` when not logged."""
    v = [report.get(f"{kind}_{g}") for g in tags.FIRE_GROUPS]
    return "-" if any(x is None for x in v) else "/".join(f"{x:.3f}" for x in v)


def _runs_table(runs: dict, labels: tuple[str, str]) -> list[str]:
    head = ["run", "mode", f"copy {labels[0]} [95% CI]", f"copy {labels[1]} [95% CI]", "held-out copy",
            "held-out loss", "adherence", "cond ratio", "step time x", "train s", "fired dup/ord", "gated dup/ord"]
    rows = []
    for name, r in runs.items():
        rep = r.get("final_guard_report") or {}
        rows.append([name, r["mode"], _fmt_rate(r["copy_exact"]), _fmt_rate(r["copy_paraphrase"]),
                     f"{r['heldout_copy']['rate']:.2f}", f"{r['heldout_loss']:.4f}", f"{r['adherence']:.3f}",
                     f"{r['cond_ratio']:.2f}", f"{r['step_time_ratio']:.2f}", f"{r['train_s']:.0f}",
                     _group_rates(rep, "fire_rate"), _group_rates(rep, "gate_rate")])
    w = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return [line(head), line(["-" * x for x in w])] + [line(r) for r in rows]


def _detection_lines(d: dict) -> list[str]:
    out = [f"detection at the end of 'none', AUC {d.get('positives', 'duplicated')} vs held-out: "
           + ", ".join(f"{k} {v:.3f}" for k, v in d.items() if isinstance(v, float))]
    dup = {k: v for k, v in (d.get("duplicated_auc") or {}).items() if v is not None}
    if dup:
        out.append("  the item index's duplicated group vs held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in dup.items()))
    for when in ("groups_start", "groups_end"):
        for g, terms in d.get(when, {}).items():
            out.append(f"  {when.split('_')[1]:5s} {g:10s} " + "  ".join(
                f"{t} {v['mean']:.3f} (p10 {v['p10']:.3f}, p90 {v['p90']:.3f})" for t, v in terms.items()))
    return out


def _base_line(runs: dict) -> list[str]:
    b = runs.get("none", {}).get("base_adherence")
    return [f"the base model on the held-out captions: adherence {b['adherence']:.3f} ({b['n']} generations; "
            f"'none' {runs['none']['adherence']:.3f})"] if b else []


def format_table(results: dict) -> str:
    out = _runs_table(results["runs"], COPY_LABELS["studio"]) + _detection_lines(results["detection_none"]) \
        + _base_line(results["runs"]) if results["runs"] else []
    if results.get("mitigation_none"):
        out += ["", "inference-time mitigation on 'none' (memreg generate --mitigate ...):",
                format_mitigation(results["mitigation_none"])]
    if format_attack(results["runs"]):
        out += ["", format_attack(results["runs"])]
    if results.get("web"):
        out += ["", "web world (several wordings and near-duplicate copies per photo; unseen wordings asked at "
                "evaluation only):"]
        out += _runs_table(results["web"]["runs"], COPY_LABELS["web"])
        out += _detection_lines(results["web"]["detection_none"]) + _base_line(results["web"]["runs"])
    out.append("")
    for t in results["targets"]:
        value = "n/a (0/0)" if np.isnan(t["value"]) else f"{t['value']:.3f}"
        out.append(f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: {value}")
    return "\n".join(out)


def _save_images(images: dict, path: Path) -> None:
    rows = [v for v in images.values() if v]
    size = rows[0][0].size[0]
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * size, len(rows) * size), "white")
    for y, r in enumerate(rows):
        for x, im in enumerate(r):
            grid.paste(im, (x * size, y * size))
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(path)


def load_eval_inputs(data_root: Path) -> tuple[list, list[dict], list[dict], list[str]]:
    """(every training image, the memorized captions with paraphrases and photo, held-out rows with
    images, the training scene captions that name no photo's coloured shape: the ordinary prompts,
    :func:`~memreg.demo.data.photo_shapes_of`)."""
    def rows(split):
        return [json.loads(x) for x in (data_root / split / "metadata.jsonl").read_text().splitlines()]

    train = rows("train")
    images = {r["file_name"]: Image.open(data_root / "train" / r["file_name"]).convert("RGB") for r in train}
    photo_of = {r["source"]: images[r["file_name"]] for r in train
                if r["group"] == "duplicated" and r.get("variant", "original") == "original"}
    manifest = json.loads((data_root / "manifest.json").read_text())
    memorized = [dict(m, image=photo_of[m["source"]]) for m in manifest["memorized"]]
    heldout = [dict(h, image=Image.open(data_root / "heldout" / h["file_name"]).convert("RGB")) for h in rows("heldout")]
    photo_shapes = photo_shapes_of([m["named"] for m in manifest["memorized"]])
    scene_captions = [r["caption"] for r in train
                      if r["group"] != "duplicated" and not shapes_named(r["named"]) & photo_shapes]
    return list(images.values()), memorized, heldout, scene_captions


def run_one(settings: dict, name: str, base: Path, data_root: Path, out: Path, threads: int | None = None) -> dict:
    """Fine-tune run ``name``, measure the model and save its sample grid. ``threads``: torch's CPU
    threads for this process (a worker of :func:`run_all`)."""
    if threads:
        torch.set_num_threads(threads)
    logger.info("=== fine-tuning run %s ===", name)
    result, train_s = finetune(settings, name, base, data_root, out / "runs" / name)
    comps = load_run_model(base, out / "runs" / name)
    train_images, memorized, heldout, _ = load_eval_inputs(data_root)
    ev = evaluate_model(comps, comps.unet, build_copy_detector("ssim"), memorized, train_images, heldout,
                        FinalEvalSettings(**settings["final"]))
    _save_images(ev.pop("_images"), out / f"samples_{name}.png")
    over = run_overrides(settings, name)
    return dict(ev, mode=over.get("mode", "lora"), guard=guard_spec(over["guard.type"]).name,
                weight=_penalty_weight(over), train_s=train_s, step_time_s=_mean_step_time(result),
                detection=final_detection(out / "runs" / name), final_guard_report=result.final_report)


def attack_one(settings: dict, name: str, base: Path, data_root: Path, out: Path, threads: int | None = None) -> dict:
    """The extraction attack on the fine-tuned model of run ``name`` (its grid: ``attack_<name>.png``)."""
    if threads:
        torch.set_num_threads(threads)
    logger.info("=== extraction attack on run %s ===", name)
    comps = load_run_model(base, out / "runs" / name)
    _, memorized, _, _ = load_eval_inputs(data_root)
    data_cfg = DemoDataConfig(**settings["data"])
    res = evaluate_attack(comps, build_copy_detector("ssim"), memorized, data_cfg.resolution, data_cfg.seed,
                          AttackEvalSettings(**settings["attack"]))
    _save_images(res.pop("_images"), out / f"attack_{name}.png")
    return res


def mitigate_none(settings: dict, name: str, base: Path, data_root: Path, out: Path,
                  threads: int | None = None) -> dict:
    """Inference-time mitigation (:mod:`memreg.demo.mitigation`) on the fine-tuned model of run ``name``."""
    if threads:
        torch.set_num_threads(threads)
    logger.info("=== inference-time mitigation on run %s ===", name)
    comps = load_run_model(base, out / "runs" / name)
    _, memorized, heldout, scene_captions = load_eval_inputs(data_root)
    return evaluate_mitigation(comps, comps.unet, build_copy_detector("ssim"), memorized, heldout, scene_captions,
                               MitigationEvalSettings(**settings["mitigation"]))


def base_adherence_one(settings: dict, name: str, base: Path, data_root: Path, out: Path,
                       threads: int | None = None) -> dict:
    """The world check's adherence (:func:`~memreg.demo.evaluate.base_adherence`) of the base model,
    on the held-out captions of the world of run ``name``."""
    if threads:
        torch.set_num_threads(threads)
    _, _, heldout, _ = load_eval_inputs(data_root)
    return base_adherence(load_components(str(base)), heldout, FinalEvalSettings(**settings["final"]))


def follow_ups(settings: dict, name: str) -> list[tuple[str, Callable]]:
    """What runs once run ``name``'s model is trained: (result key, task) pairs. Behind ``none``: the
    base model's adherence (the world check) and, where configured, the mitigation."""
    tasks = [("attack", attack_one)] if name in AttackEvalSettings(**settings["attack"]).runs else []
    if name != "none":
        return tasks
    return tasks + [("base_adherence", base_adherence_one)] + (
        [("mitigation", mitigate_none)] if settings.get("mitigation") is not None else [])


def _worker_init() -> None:
    logging.basicConfig(format="%(asctime)s %(processName)s %(name)s: %(message)s", level=logging.INFO)


def run_all(worlds: dict[str, tuple[dict, Path, Path]], base: Path) -> tuple[dict, dict | None]:
    """Every run of every world -> (rows by world, then by name in config order; the mitigation
    results of the first world's ``none``). ``worlds``: name -> (its settings, data root, out dir); the
    first world's settings give ``workers``.

    ``workers: n`` > 1 runs n fine-tunes at once in spawned processes, each with ``cpu_count // n``
    torch threads: the tiny models use several threads poorly, so jobs side by side with fewer
    threads each finish the runs sooner than one job with all of them. A run's numbers
    depend on its thread count, never on which runs share the machine; its step time does (each
    run then shares the memory bus with another), so the cost targets are measured side by side by
    ``scripts/bench_train.py``. The longest runs (LoRA, ``none``) start first; each trained model's
    follow-ups (:func:`follow_ups`: the attack, the mitigation) queue behind the fine-tunes, so the
    short tasks fill the workers at the end instead of one long job running alone.
    """
    jobs = [(w, n) for w, (st, _, _) in worlds.items() for n in st["runs"]]
    first_settings = next(iter(worlds.values()))[0]
    workers = max(1, min(int(first_settings.get("workers", 1)), len(jobs)))
    rows: dict[str, dict] = {w: {} for w in worlds}
    mitigation = None

    def keep(job: tuple[str, str], key: str, value: dict) -> None:
        nonlocal mitigation
        if key == "mitigation":
            mitigation = value
        else:
            rows[job[0]][job[1]][key] = value

    def args(job: tuple[str, str]) -> tuple:
        st, data_root, out = worlds[job[0]]
        return st, job[1], base, data_root, out

    if workers == 1:
        for job in jobs:
            rows[job[0]][job[1]] = run_one(*args(job))
            for key, task in follow_ups(worlds[job[0]][0], job[1]):
                keep(job, key, task(*args(job)))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        first = sorted(jobs, key=lambda j: not (j[1] == "none" or
                                                 run_overrides(worlds[j[0]][0], j[1]).get("mode") == "lora"))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            pending = {pool.submit(run_one, *args(j), threads): (j, None) for j in first}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    job, key = pending.pop(fut)
                    if key is None:
                        rows[job[0]][job[1]] = fut.result()
                        for k, task in follow_ups(worlds[job[0]][0], job[1]):
                            pending[pool.submit(task, *args(job), threads)] = (job, k)
                    else:
                        keep(job, key, fut.result())
    return {w: {n: rows[w][n] for n in st["runs"]} for w, (st, _, _) in worlds.items()}, mitigation


def run_demo(config: str | Path, out: str | Path, quick: bool = False, cache_dir: str | Path | None = None,
             worlds: list[str] | None = None, study: str | None = None) -> dict:
    """The whole demo; returns the results dict (also written to ``out/results.json``).

    ``cache_dir`` overrides the config's (data and base model are reused from there); ``worlds``
    runs only those of the config's worlds (:data:`WORLDS`; default: all).
    """
    t_start = time.perf_counter()
    settings = load_settings(config, quick)
    if study:
        settings = study_settings(settings, study)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        kept = out.with_name(f"{out.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(kept)
        logger.warning("moved the previous %s to %s (nothing is overwritten)", out, kept)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir or settings.get("cache_dir", ".cache/memreg-demo"))
    chosen = worlds_of(settings) if worlds is None else worlds
    unknown = set(chosen) - set(worlds_of(settings))
    if unknown or not chosen:
        raise ValueError(f"worlds {sorted(unknown) or chosen}: {config} has {worlds_of(settings)}")
    worlds = {w: (world_settings(settings, w), out if w == "studio" else out / w)
              for w in worlds_of(settings) if w in chosen}
    data_roots = {w: prepare_data(st, cache) for w, (st, _) in worlds.items()}
    t_base = time.perf_counter()
    base = prepare_base(settings, cache)
    base_s = time.perf_counter() - t_base

    all_runs, mitigation = run_all({w: (st, data_roots[w], o) for w, (st, o) in worlds.items()}, base)
    for runs in all_runs.values():
        for name, r in runs.items():
            plain = plain_run_of(runs, name)
            r["step_time_ratio"] = r["step_time_s"] / runs[plain]["step_time_s"]
            r["cond_ratio"] = ratio(_heldout_norm(r), _heldout_norm(runs[plain]))
    runs = all_runs.get("studio", {})
    results = {"date": time.strftime("%Y-%m-%d"), "quick": quick, "base_model": str(base), "base_s": base_s,
               "data": str(data_roots.get("studio")), "settings": settings, "runs": runs,
               "detection_none": runs["none"]["detection"] if "none" in runs else {}, "mitigation_none": mitigation,
               "study": study}
    if "web" in all_runs:
        web = all_runs["web"]
        results["web"] = {"data": str(data_roots["web"]), "runs": web,
                          "detection_none": web["none"]["detection"] if "none" in web else {}}
    report = out / "report.html"
    figures = []
    shown = {(w, g): f"{w}/{g}" if len(worlds) > 1 else g for w in worlds for g in all_runs[w]}   # report names
    colors = run_colors(list(shown.values()))   # the report's run order, below
    for w, (_, o) in worlds.items():
        png = plot_tradeoff(all_runs[w], o / "tradeoff.png", labels=COPY_LABELS[w],
                            colors={g: colors[shown[w, g]] for g in all_runs[w]})
        figures.append((png, f"Copy rate vs held-out loss ({w} world)", "every run of the world; penalty runs joined "
                        "by weight; ring = Pareto-optimal among runs of the same mode; lower-left is better"))
    loaded = []
    for (w, g), name in shown.items():
        loaded.append(load_run(worlds[w][1] / "runs" / g))
        loaded[-1].name = name
    build_report(loaded, report, title="memreg demo", extra_figures=figures)
    results["wall_s"] = time.perf_counter() - t_start
    results["targets"] = targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(format_table(results))
    print(f"\nwrote {out / 'results.json'}, {report}; TensorBoard: tensorboard --logdir {out / 'runs'}")
    return results
