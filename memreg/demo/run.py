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
3. Each fine-tuned model is measured (:mod:`memreg.demo.evaluate`); targets are computed, a table
   is printed, and ``results.json``, ``tradeoff.png`` (:mod:`memreg.demo.tradeoff`) and
   ``report.html`` (``memreg report``, the trade-off plot on top) are written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from memreg import log_tags as tags
from memreg.copy_detect import build_copy_detector
from memreg.demo.attack import AttackEvalSettings, attack_targets_of, evaluate_attack, format_attack
from memreg.demo.data import DemoDataConfig, build_demo_dataset, pretrain_rows
from memreg.demo.evaluate import FinalEvalSettings, evaluate_model
from memreg.demo.mitigation import MitigationEvalSettings, evaluate_mitigation, format_mitigation, mitigation_targets
from memreg.demo.tradeoff import plot_tradeoff
from memreg.demo.vae import train_vae
from memreg.detect import fit_weights
from memreg.generation import build_pipeline
from memreg.guards import GUARDS, guard_spec
from memreg.guards.anisotropy_gate.config import AnisotropyGateConfig
from memreg.models import load_components
from memreg.report import build_report, load_run
from memreg.testing import build_tiny_sd
from memreg.training.config import load_config, load_yaml
from memreg.training.loop import train

logger = logging.getLogger("memreg.demo")
SECTIONS = {"cache_dir", "workers", "data", "base", "finetune", "runs", "final", "mitigation", "attack"}


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
        settings.setdefault(section, {})
        unknown = set(settings[section]) - {f.name for f in fields(known)}
        if unknown:
            raise ValueError(f"{path}: unknown {section}: key(s) {sorted(unknown)}")
    workers = settings.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{path}: workers must be an integer >= 1, got {workers!r}")
    for name in settings.get("runs") or {}:
        run_overrides(settings, name)  # every run's guard is named before anything is built
    return settings


def prepare_data(settings: dict, cache: Path) -> Path:
    cfg = DemoDataConfig(**settings["data"])
    root = cache / f"data-{_key(asdict(cfg))}"
    if not (root / "manifest.json").is_file():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_dataset(tmp, cfg)
        tmp.rename(root)
        logger.info("demo data written to %s", root)
    return root


def _pretrain_folder(root: Path, data_cfg: DemoDataConfig, n: int) -> Path:
    """Scenes of the demo world (other draws, no photos): the base model's pre-training data."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.jsonl").open("w") as f:
        for img, meta in pretrain_rows(n, data_cfg):
            img.save(root / meta["file_name"])
            f.write(json.dumps({"file_name": meta["file_name"], "caption": meta["caption"]}) + "\n")
    return root


def prepare_base(settings: dict, data_root: Path, cache: Path) -> Path:
    """Build (or reuse) the base model: tiny SD + trained VAE + generic pre-training."""
    b = settings["base"]
    data_cfg = DemoDataConfig(**settings["data"])
    root = cache / f"base-{_key(asdict(data_cfg), b)}"
    if (root / "model_index.json").is_file():
        logger.info("base model: cached at %s", root)
        return root
    work = root.with_name(root.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    init = build_tiny_sd(work / "init", sample_size=data_cfg.resolution, unet_channels=tuple(b["unet_channels"]),
                         vae_downsample=False, cross_attention_dim=b["cross_attention_dim"],
                         attention_levels=b["attention_levels"], seed=b["seed"])
    pre = _pretrain_folder(work / "pretrain", data_cfg, b["pretrain_images"])
    rows = [json.loads(x) for x in (data_root / "train" / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(data_root / "train" / r["file_name"]).convert("RGB") for r in rows]
    images += [Image.open(p).convert("RGB") for p in sorted(pre.glob("*.png"))[:len(images)]]
    vae = AutoencoderKL.from_pretrained(init, subfolder="vae")
    vae_stats = train_vae(vae, images, steps=b["vae_steps"], seed=b["seed"])
    vae.save_pretrained(init / "vae", safe_serialization=True)
    logger.info("base model: VAE trained (%s)", vae_stats)
    cfg = load_config([], overrides={
        "pretrained_model_name_or_path": str(init), "train_data_dir": str(pre), "caption_column": "caption",
        "mode": "full", "train_text_encoder": True, "resolution": data_cfg.resolution, "center_crop": True,
        "train_batch_size": b["batch_size"], "learning_rate": b["learning_rate"], "lr_scheduler": "cosine",
        "lr_warmup_steps": 50, "max_train_steps": b["steps"], "seed": b["seed"], "cache_latents": True,
        "proportion_empty_prompts": b["proportion_empty_prompts"], "output_dir": str(work / "model"),
        "checkpointing_steps": 10 ** 9, "report_to": "none"})
    train(cfg)
    (work / "model" / "base_info.json").write_text(json.dumps(
        {"vae": vae_stats, "seconds": time.perf_counter() - t0, "settings": b}, indent=2))
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


def finetune(settings: dict, name: str, base: Path, data_root: Path, run_dir: Path):
    over = run_overrides(settings, name)
    over.update({"pretrained_model_name_or_path": str(base), "train_data_dir": str(data_root / "train"),
                 "output_dir": str(run_dir), "eval.heldout_prompts": str(data_root / "heldout" / "metadata.jsonl"),
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


def _final_detection(run_dir: Path) -> dict:
    """AUC duplicated-vs-heldout of the monitor's last detection eval: norm, align and the paper's
    combined score (SD1 weights), a combined score with g1/g2 fitted by cross-validated logistic
    regression (out-of-fold AUC; ``memreg detect --fit-weights``), and the per-group distributions at
    the first eval (the base model) and the last."""
    files = sorted((run_dir / "memorization").glob("eval_step*.json"),
                   key=lambda p: int(p.stem.removeprefix("eval_step")))
    if not files:
        return {}
    first, last = (json.loads(f.read_text()) for f in (files[0], files[-1]))
    out = {t: last["scalars"].get(tags.eval_auc("duplicated_vs_heldout", t)) for t in ("norm", "align", "score")}
    rows = [(r, 1) for r in last["groups"].get("duplicated", [])] + [(r, 0) for r in last["groups"].get("heldout", [])]
    if rows:
        fit = fit_weights([r["norm"] for r, _ in rows], [r["align"] for r, _ in rows], [y for _, y in rows])
        if "out_of_fold" in fit:
            out["score_fitted_oof"] = fit["out_of_fold"]["auc"]
            out["fitted_g1_g2"] = [fit["g1"], fit["g2"]]
    out["groups_start"] = _group_stats(first["groups"])
    out["groups_end"] = _group_stats(last["groups"])
    return out


def _load_model(base: Path, run_dir: Path):
    if (run_dir / "unet").is_dir():
        comps = load_components(str(run_dir))
    else:
        comps = load_components(str(base))
        build_pipeline(comps).load_lora_weights(str(run_dir))
    return comps


def ratio(a: float, b: float) -> float:
    """a / b, undefined (nan) when b is 0: a check on a ratio with nothing to compare then MISSes,
    the same verdict for every ratio check (in ``--quick`` runs too)."""
    return a / b if b else float("nan")


def dominates(a: dict, b: dict) -> bool:
    """Run ``a`` is at least as good as ``b`` on exact copy rate, held-out loss and adherence, and better on one."""
    ka = (a["copy_exact"]["rate"], a["heldout_loss"], -a["adherence"])
    kb = (b["copy_exact"]["rate"], b["heldout_loss"], -b["adherence"])
    return all(x <= y for x, y in zip(ka, kb)) and any(x < y for x, y in zip(ka, kb))


def _guard_targets(runs: dict, plain: str, guarded: str, baselines: list[str]) -> list[tuple]:
    """The guard's targets (five-fold, selectively): ``guarded`` against ``plain``."""
    p, g = runs[plain], runs[guarded]
    rows = []
    for key, label in (("copy_exact", "exact"), ("copy_paraphrase", "paraphrased")):
        r = ratio(g[key]["rate"], p[key]["rate"])
        rows.append((f"{guarded} copy rate ({label}) <= 1/5 of {plain}'s", r, r <= 0.2))
    r = ratio(g["heldout_loss"], p["heldout_loss"])
    rows.append((f"{guarded} held-out loss <= 1.05x {plain}'s", r, r <= 1.05))
    r = ratio(g["adherence"], p["adherence"])
    rows.append((f"{guarded} adherence >= 0.95x {plain}'s", r, r >= 0.95))
    rows.append((f"{guarded} step time <= 1.3x {plain}'s", g["step_time_ratio"], g["step_time_ratio"] <= 1.3))
    for b in baselines:
        dom = dominates(runs[b], g)
        rows.append((f"{b} does not dominate {guarded} (copy, loss, adherence; 1 = dominates)", float(dom), not dom))
    return rows


def targets(results: dict) -> list[dict]:
    """The demo's targets, each computed from ``results`` (never hard-coded outcomes)."""
    runs = results["runs"]
    rows = []
    for name, floor in (("none", 0.5), ("lora_none", 0.3)):
        if name in runs:
            v = runs[name]["copy_exact"]["rate"]
            rows.append((f"{name} memorizes: exact-caption copy rate >= {floor}", v, v >= floor))
    auc = results["detection_none"].get("score")
    auc = float("nan") if auc is None else auc
    rows.append(("detection at the end of none, paper's SD1 score (g1=1, g2=2), AUC dup vs held-out >= 0.95", auc,
                 auc >= 0.95))
    v = runs["none"]["adherence"]
    rows.append(("none follows held-out captions: adherence >= 0.8", v, v >= 0.8))
    baselines = [b for b in ("wen_filter", "caption_noise", "agc") if b in runs]
    for plain, guarded in (("none", "penalty"), ("lora_none", "lora_penalty")):
        if plain in runs and guarded in runs:
            rows += _guard_targets(runs, plain, guarded, baselines if plain == "none" else [])
    if results.get("mitigation_none"):
        rows += mitigation_targets(results["mitigation_none"])
    rows += attack_targets_of(runs)
    rows.append(("make demo wall time <= 25 min", results["wall_s"] / 60, results["wall_s"] <= 25 * 60))
    return [{"target": t, "value": float(v), "pass": bool(ok)} for t, v, ok in rows]


def _fmt_rate(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['rate']:.2f} [{lo:.2f},{hi:.2f}]"


def format_table(results: dict) -> str:
    head = ["run", "mode", "copy exact [95% CI]", "copy paraphrased [95% CI]", "held-out copy", "held-out loss",
            "adherence", "cond ratio", "step time x", "train s"]
    rows = []
    for name, r in results["runs"].items():
        rows.append([name, r["mode"], _fmt_rate(r["copy_exact"]), _fmt_rate(r["copy_paraphrase"]),
                     f"{r['heldout_copy']['rate']:.2f}", f"{r['heldout_loss']:.4f}", f"{r['adherence']:.3f}",
                     f"{r['cond_ratio']:.2f}", f"{r['step_time_ratio']:.2f}", f"{r['train_s']:.0f}"])
    w = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    out = [line(head), line(["-" * x for x in w])] + [line(r) for r in rows]
    d = results["detection_none"]
    out.append("detection at the end of 'none', AUC duplicated vs held-out: "
               + ", ".join(f"{k} {v:.3f}" for k, v in d.items() if isinstance(v, float)))
    for when in ("groups_start", "groups_end"):
        for g, terms in d.get(when, {}).items():
            out.append(f"  {when.split('_')[1]:5s} {g:10s} " + "  ".join(
                f"{t} {v['mean']:.3f} (p10 {v['p10']:.3f}, p90 {v['p90']:.3f})" for t, v in terms.items()))
    if results.get("mitigation_none"):
        out += ["", "inference-time mitigation on 'none' (memreg generate --mitigate ...):",
                format_mitigation(results["mitigation_none"])]
    if format_attack(results["runs"]):
        out += ["", format_attack(results["runs"])]
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
    images, the training scene captions)."""
    def rows(split):
        return [json.loads(x) for x in (data_root / split / "metadata.jsonl").read_text().splitlines()]

    train = rows("train")
    images = {r["file_name"]: Image.open(data_root / "train" / r["file_name"]).convert("RGB") for r in train}
    photo_of = {r["caption"]: images[r["file_name"]] for r in train if r["group"] == "duplicated"}
    manifest = json.loads((data_root / "manifest.json").read_text())
    memorized = [dict(m, image=photo_of[m["caption"]]) for m in manifest["memorized"]]
    heldout = [dict(h, image=Image.open(data_root / "heldout" / h["file_name"]).convert("RGB")) for h in rows("heldout")]
    scene_captions = [r["caption"] for r in train if r["group"] != "duplicated"]
    return list(images.values()), memorized, heldout, scene_captions


def run_one(settings: dict, name: str, base: Path, data_root: Path, out: Path, threads: int | None = None) -> dict:
    """Fine-tune run ``name``, measure the model and save its sample grid. ``threads``: torch's CPU
    threads for this process (a worker of :func:`run_all`)."""
    if threads:
        torch.set_num_threads(threads)
    logger.info("=== fine-tuning run %s ===", name)
    result, train_s = finetune(settings, name, base, data_root, out / "runs" / name)
    comps = _load_model(base, out / "runs" / name)
    train_images, memorized, heldout, _ = load_eval_inputs(data_root)
    ev = evaluate_model(comps, comps.unet, build_copy_detector("ssim"), memorized, train_images, heldout,
                        FinalEvalSettings(**settings["final"]))
    _save_images(ev.pop("_images"), out / f"samples_{name}.png")
    over = run_overrides(settings, name)
    return dict(ev, mode=over.get("mode", "lora"), guard=guard_spec(over["guard.type"]).name,
                weight=_penalty_weight(over), train_s=train_s, step_time_s=_mean_step_time(result),
                detection=_final_detection(out / "runs" / name), final_guard_report=result.final_report)


def attack_one(settings: dict, name: str, base: Path, data_root: Path, out: Path, threads: int | None = None) -> dict:
    """The extraction attack on the fine-tuned model of run ``name`` (its grid: ``attack_<name>.png``)."""
    if threads:
        torch.set_num_threads(threads)
    logger.info("=== extraction attack on run %s ===", name)
    comps = _load_model(base, out / "runs" / name)
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
    comps = _load_model(base, out / "runs" / name)
    _, memorized, heldout, scene_captions = load_eval_inputs(data_root)
    return evaluate_mitigation(comps, comps.unet, build_copy_detector("ssim"), memorized, heldout, scene_captions,
                               MitigationEvalSettings(**settings["mitigation"]))


def follow_ups(settings: dict, name: str) -> list[tuple[str, Callable]]:
    """What runs on run ``name``'s model once it is trained: (result key, task) pairs."""
    tasks = [("attack", attack_one)] if name in AttackEvalSettings(**settings["attack"]).runs else []
    return tasks + ([("mitigation", mitigate_none)] if name == "none" else [])


def _worker_init() -> None:
    logging.basicConfig(format="%(asctime)s %(processName)s %(name)s: %(message)s", level=logging.INFO)


def run_all(settings: dict, base: Path, data_root: Path, out: Path) -> tuple[dict, dict | None]:
    """Every run of ``runs:`` -> (rows by name in config order, the mitigation results of ``none``).

    ``workers: n`` > 1 runs n fine-tunes at once in spawned processes, each with ``cpu_count // n``
    torch threads: the tiny models use several threads poorly, so jobs side by side with fewer
    threads each finish the runs sooner than one job with all of them. A run's numbers
    depend on its thread count, never on which runs share the machine; its step time does (each
    run then shares the memory bus with another), so the cost targets are measured side by side by
    ``scripts/bench_train.py``. The longest runs (LoRA, ``none``) start first; each trained model's
    follow-ups (:func:`follow_ups`: the attack, the mitigation) queue behind the fine-tunes, so the
    short tasks fill the workers at the end instead of one long job running alone.
    """
    names = list(settings["runs"])
    workers = max(1, min(int(settings.get("workers", 1)), len(names)))
    rows: dict[str, dict] = {}
    mitigation = None

    def keep(name: str, key: str, value: dict) -> None:
        nonlocal mitigation
        if key == "mitigation":
            mitigation = value
        else:
            rows[name][key] = value

    if workers == 1:
        for n in names:
            rows[n] = run_one(settings, n, base, data_root, out)
            for key, task in follow_ups(settings, n):
                keep(n, key, task(settings, n, base, data_root, out))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        first = sorted(names, key=lambda n: not (n == "none" or run_overrides(settings, n).get("mode") == "lora"))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init) as pool:
            pending = {pool.submit(run_one, settings, n, base, data_root, out, threads): (n, None) for n in first}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    n, key = pending.pop(fut)
                    if key is None:
                        rows[n] = fut.result()
                        for k, task in follow_ups(settings, n):
                            pending[pool.submit(task, settings, n, base, data_root, out, threads)] = (n, k)
                    else:
                        keep(n, key, fut.result())
    return {n: rows[n] for n in names}, mitigation


def run_demo(config: str | Path, out: str | Path, quick: bool = False, cache_dir: str | Path | None = None) -> dict:
    """The whole demo; returns the results dict (also written to ``out/results.json``).

    ``cache_dir`` overrides the config's (data and base model are reused from there).
    """
    t_start = time.perf_counter()
    settings = load_settings(config, quick)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        kept = out.with_name(f"{out.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(kept)
        logger.warning("moved the previous %s to %s (nothing is overwritten)", out, kept)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir or settings.get("cache_dir", ".cache/memreg-demo"))
    data_root = prepare_data(settings, cache)
    t_base = time.perf_counter()
    base = prepare_base(settings, data_root, cache)
    base_s = time.perf_counter() - t_base

    runs, mitigation = run_all(settings, base, data_root, out)
    for name, r in runs.items():
        plain = "lora_none" if r["mode"] == "lora" and "lora_none" in runs else "none"
        r["step_time_ratio"] = r["step_time_s"] / runs[plain]["step_time_s"]
        r["cond_ratio"] = ratio(_heldout_norm(r), _heldout_norm(runs[plain]))
    results = {"date": time.strftime("%Y-%m-%d"), "quick": quick, "base_model": str(base), "base_s": base_s,
               "data": str(data_root), "settings": settings, "runs": runs,
               "detection_none": runs["none"]["detection"], "mitigation_none": mitigation}
    report = out / "report.html"
    png = plot_tradeoff(runs, out / "tradeoff.png")
    build_report([load_run(out / "runs" / g) for g in runs], report, title="memreg demo",
                 extra_figures=[(png, "Copy rate vs held-out loss", "every run of the demo; penalty runs joined by "
                                 "weight; ring = Pareto-optimal among runs of the same mode; lower-left is better")])
    results["wall_s"] = time.perf_counter() - t_start
    results["targets"] = targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(format_table(results))
    print(f"\nwrote {out / 'results.json'}, {report}; TensorBoard: tensorboard --logdir {out / 'runs'}")
    return results
