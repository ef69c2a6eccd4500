"""Periodic memorization monitoring during fine-tuning.

The training loop calls ``monitor.maybe_run(step, unet=unet)`` at step 0 and after every optimizer
step (``final=True`` once at the end); it is a no-op unless an eval is due. On the main process:

* **Detection eval** (every ``eval.every_n_steps``, at step 0 = the base model's baseline, and at the
  end): the anisotropy score (:mod:`memreg.score`) of prompt groups -- explicit ``memorized`` /
  ``reference`` prompt files, and groups built from the training set: ``duplicated`` captions
  (their image's pixels occur >= ``eval.dup_min_count`` times, found by content hash, see
  :mod:`memreg.duplicates`), ``unique`` captions and ``heldout`` captions. Fixed probe noise: the
  latents of prompt ``i``'s draw ``d`` come from a ``torch.Generator`` seeded by
  ``(eval.seed, i, d)`` in every eval and every group (paired across groups), so curves over steps
  compare. Logs per-group mean/p50/p95 of score, norm and align, AUC and TPR@1%FPR of the contrasts,
  histograms, an ROC figure and a top-k table of the highest-scoring training captions.
* **Copy check** (every ``eval.generate_every_n_steps``, 0 = only at the end; at the end when
  ``eval.generate_at_end``): DDIM generations for a few prompts per group with fixed seeds, each
  compared with every training image by a copy detector (:mod:`memreg.copy_detect`): nearest
  training image, similarity to the caption's own training image, memorized fraction above the
  detector's threshold, image grids.

Everything runs under ``torch.no_grad()`` on the weights in effect (the ``unet`` handed in: LoRA
adapters active or EMA weights swapped in by the caller), with the modules in eval mode; each
module's train/eval mode and the global torch (CPU and CUDA), ``random`` and numpy RNG states are
restored afterwards, and the eval draws only from its own generators, so the training RNG stream is
unchanged. Scalars go through ``accelerator.log``; histograms, figures, text and images through the
TensorBoard tracker's ``SummaryWriter`` (skipped, with one warning, without a TensorBoard tracker).
Per-prompt results are also written to ``output_dir/memorization/eval_step{step:08d}.json`` (detection)
and ``copy_step{step:08d}.json`` (copy check).

Tags (built by :mod:`memreg.log_tags`, which ``memreg report`` reads with; ``<g>`` a group, ``<c>`` a
contrast such as ``duplicated_vs_heldout``, ``<t>`` norm | align | score)::

    eval/<g>/<t>_mean, eval/<g>/<t>_p50, eval/<g>/<t>_p95, eval/<g>/n_prompts, eval/seconds
    eval/auc/<c>/<t>, eval/tpr_at_1pct_fpr/<c>/<t>
    eval_hist/<g>/<t>        (histogram)     eval/roc (figure)     eval/top_k_captions (text)
    copy/<g>/memorized_frac (nearest training image over the threshold), copy/<g>/sim_mean,
    copy/<g>/sim_p95, copy/<g>/own_sim_mean, copy/<g>/own_sim_p95, copy/<g>/own_memorized_frac (the
    caption's own training image over the threshold), copy/threshold, copy/seconds
    copy_hist/<g>/similarity (histogram)     copy_grid/<g> (image)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from memreg import generation
from memreg import log_tags as tags
from memreg.copy_detect import available_copy_detectors, detector_from_config
from memreg.duplicates import DuplicateIndex, find_duplicates, first_caption
from memreg.families import prompt_encoder
from memreg.image_io import load_rgb
from memreg.metrics import auroc, roc_points, tpr_at_fpr
from memreg.monitor_config import EvalConfig
from memreg.prompt_io import read_prompts
from memreg.score import make_scorer, mean_scores

logger = logging.getLogger(__name__)

GROUPS = ("memorized", "reference", "duplicated", "unique", "heldout")
TRAINING_GROUPS = ("duplicated", "unique")
CONTRASTS = (("duplicated", "heldout"), ("duplicated", "unique"), ("memorized", "reference"))
MAX_FPR = 0.01


def derive_seed(*parts) -> int:
    """A 63-bit seed from the parts (stable across runs, processes and platforms)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class EvalPrompt:
    text: str
    group: str
    dup_count: int = 0               # training records whose image is this caption's image (0: not a training caption)
    image_hash: str | None = None    # content hash of the caption's own training image
    record_id: Any = None


def subsample(items: list, k: int, seed: int, group: str) -> list:
    """At most ``k`` items, a seeded random subset kept in the original order (deterministic)."""
    if len(items) <= k:
        return list(items)
    rng = random.Random(f"{seed}/{group}")
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


def quantiles(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95))}


def roc_metrics(pos: np.ndarray, neg: np.ndarray, max_fpr: float = MAX_FPR):
    """(AUC, TPR at FPR <= max_fpr, fpr, tpr) of positives vs negatives; higher = more memorized."""

    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg].astype(np.float64)
    fpr, tpr, _ = roc_points(y, s)
    return auroc(y, s), tpr_at_fpr(y, s, max_fpr), fpr, tpr


@contextmanager
def preserved_training_state(*modules):
    """Eval mode + no_grad inside; each submodule's mode and the global RNG states restored after."""
    modes = [(m, m.training) for mod in modules if mod is not None for m in mod.modules()]
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        for mod in modules:
            if mod is not None:
                mod.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        np.random.set_state(np_state)


@dataclass
class CopyCheck:
    """One copy check's generations: ``jobs`` (group, prompt index, image index, EvalPrompt), the
    images, each one's best similarity to any training image and that image's record row, and its
    similarity to its own training image (nan / None when the prompt has none)."""

    jobs: list[tuple]
    images: list
    best: torch.Tensor
    nearest_rows: list[int]
    own: torch.Tensor
    own_rows: list[int | None]
    threshold: float

    def groups(self) -> dict[str, list[int]]:
        """group -> indices of its jobs, in first-seen order."""
        out: dict[str, list[int]] = {}
        for n, job in enumerate(self.jobs):
            out.setdefault(job[0], []).append(n)
        return out


class MemorizationMonitor:
    """Runs the detection eval and the copy check when due; see the module docstring.

    Args:
        cfg: the ``eval:`` config (an :class:`EvalConfig` or a dict of its fields).
        components: :class:`memreg.models.SDComponents` (tokenizer(s), text encoder(s), VAE, scheduler; any family).
        train_records / heldout_records: dicts ``{"image": PIL image or path, "caption": str or
            list[str], "id": ...}``; heldout_records may be empty (``cfg.heldout_prompts`` then).
        accelerator: an ``accelerate.Accelerator``; only its main process evaluates. ``None``: run
            here, scalars to ``writer`` if given.
        output_dir: where per-step JSON results go (``output_dir/memorization``); None: not written.
        writer: a SummaryWriter to use instead of the accelerator's TensorBoard tracker.
        dup_index: the run's duplicate index of ``train_records`` when the caller already built one (the
            trainer shares one with the guard); None: built here on first use.
    """

    def __init__(self, cfg: EvalConfig | dict, components, train_records: Sequence[dict] = (),
                 heldout_records: Sequence[dict] | None = None, accelerator=None,
                 output_dir: str | Path | None = None, writer=None, dup_index: DuplicateIndex | None = None):
        if isinstance(cfg, dict):
            unknown = set(cfg) - {f.name for f in dataclasses.fields(EvalConfig)}
            if unknown:
                raise ValueError(f"eval: unknown field(s) {sorted(unknown)}")
            cfg = EvalConfig(**cfg)
        cfg.validate()
        self.cfg = cfg
        self.components = components
        self.train_records = list(train_records or [])
        self.heldout_records = list(heldout_records or [])
        self.accelerator = accelerator
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._writer_override = writer
        self._warned_no_writer = False
        self._groups: dict[str, list[EvalPrompt]] | None = None
        self._dup_index: DuplicateIndex | None = dup_index
        self._file_prompts: dict[str, list[str]] = {}
        self._detector = None
        self._refs: tuple[torch.Tensor, list[int], dict[str, int]] | None = None
        self.done_detect: set[int] = set()
        self.done_copy: set[int] = set()
        if cfg.enabled:
            self._check_inputs()

    # ------------------------------------------------------------------ scheduling
    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def due(self, step: int, final: bool = False) -> tuple[bool, bool]:
        """(detection due, copy check due) at ``step``."""
        c = self.cfg
        if not c.enabled:
            return False, False
        detect = step == 0 or final or (c.every_n_steps > 0 and step % c.every_n_steps == 0)
        copy = c.max_generate_prompts > 0 and (
            (c.generate_every_n_steps > 0 and step % c.generate_every_n_steps == 0)
            or (final and c.generate_at_end))
        return detect and step not in self.done_detect, copy and step not in self.done_copy

    def maybe_run(self, step: int, unet=None, final: bool = False) -> dict[str, float] | None:
        """Run what is due at ``step`` on the main process; returns the logged scalars (or None)."""
        if not self.cfg.enabled or not self.is_main_process:
            return None
        detect, copy = self.due(step, final)
        if not (detect or copy):
            return None
        unet = unet if unet is not None else self.components.unet
        if self.accelerator is not None:
            unet = self.accelerator.unwrap_model(unet)
        scalars: dict[str, float] = {}
        c = self.components
        with preserved_training_state(unet, *c.text_encoders, c.vae), self._autocast():
            if detect:
                s, detail = self.run_detection(step, unet)
                scalars.update(s)
                self.done_detect.add(step)
                self._write_json(f"eval_step{step:08d}.json", {"step": step, "scalars": s, "groups": detail})
            if copy:
                s, detail = self.run_copy_check(step, unet)
                scalars.update(s)
                self.done_copy.add(step)
                self._write_json(f"copy_step{step:08d}.json", {"step": step, "scalars": s, "groups": detail})
        return scalars

    # ------------------------------------------------------------------ prompt groups
    def _check_inputs(self) -> None:

        c = self.cfg
        for group, path in (("memorized", c.memorized_prompts), ("reference", c.reference_prompts),
                            ("heldout", c.heldout_prompts)):
            if path:
                self._file_prompts[group] = read_prompts(path).prompts  # fails early, naming the file

        if c.copy_detector not in available_copy_detectors():
            raise ValueError(f"eval.copy_detector: unknown detector {c.copy_detector!r}; "
                             f"choose one of {available_copy_detectors()}")
        if c.copy_detector == "sscd" and not Path(c.sscd_path).is_file():
            raise FileNotFoundError(f"eval.sscd_path {c.sscd_path!r} does not exist (SSCD weights are never downloaded)")

    @property
    def dup_index(self) -> DuplicateIndex:
        if self._dup_index is None:
            t = time.perf_counter()
            self._dup_index = find_duplicates(self.train_records, clusters_from=self.cfg.duplicates_from)
            n_dup = len(self._dup_index.groups(self.cfg.dup_min_count))
            logger.info("memorization monitor: hashed %d training images in %.1fs; %d image(s) occur >= %d times",
                        len(self.train_records), time.perf_counter() - t, n_dup, self.cfg.dup_min_count)
        return self._dup_index

    def groups(self) -> dict[str, list[EvalPrompt]]:
        """The (subsampled, fixed) prompt groups, built on first use; empty groups left out."""
        if self._groups is not None:
            return self._groups
        c = self.cfg
        # caption -> the training image it goes with (the most duplicated one if several)
        by_caption: dict[str, tuple[int, str, Any]] = {}
        dup_items: dict[str, EvalPrompt] = {}
        unique_items: dict[str, EvalPrompt] = {}
        if self.train_records:
            idx = self.dup_index
            for i, rec in enumerate(self.train_records):
                text = first_caption(rec.get("caption"))
                if not text:
                    continue
                count, h = idx.count(i), idx.hashes[i]
                if text not in by_caption or count > by_caption[text][0]:
                    by_caption[text] = (count, h, rec.get("id", i))
            for text, (count, h, rid) in by_caption.items():
                item = EvalPrompt(text, "", count, h, rid)
                if count >= c.dup_min_count:
                    dup_items[text] = dataclasses.replace(item, group="duplicated")
                elif count == 1:
                    unique_items[text] = dataclasses.replace(item, group="unique")

        def from_texts(group: str, texts: list[str]) -> list[EvalPrompt]:
            out = []
            for text in dict.fromkeys(t.strip() for t in texts if t and t.strip()):
                count, h, rid = by_caption.get(text, (0, None, None))
                out.append(EvalPrompt(text, group, count, h, rid))
            return out

        raw: dict[str, list[EvalPrompt]] = {
            "memorized": from_texts("memorized", self._file_prompts.get("memorized", [])),
            "reference": from_texts("reference", self._file_prompts.get("reference", [])),
            "duplicated": list(dup_items.values()),
            "unique": list(unique_items.values()),
        }
        if self.heldout_records:
            raw["heldout"] = from_texts("heldout", [first_caption(r.get("caption")) for r in self.heldout_records])
            if "heldout" in self._file_prompts:
                logger.info("memorization monitor: held-out records given; eval.heldout_prompts is not used")
        else:
            raw["heldout"] = from_texts("heldout", self._file_prompts.get("heldout", []))
        self._groups = {g: subsample(raw[g], c.max_prompts_per_group, c.seed, g) for g in GROUPS if raw[g]}
        if not self._groups:
            logger.warning("memorization monitor: no prompts to evaluate (no training captions, no prompt files)")
        return self._groups

    # ------------------------------------------------------------------ detection eval
    def _scorer(self, unet):
        c = self.cfg
        return make_scorer(unet, self.components.scheduler, preset=c.preset, g1=c.g1, g2=c.g2, t_hi=c.t_hi,
                           t_lo=c.t_lo, space=c.score_space)

    def noise_seeds(self) -> list[int]:
        """The noise seeds of every eval: ``eval.seed`` .. ``eval.seed + eval.seeds - 1``, the same
        as ``memreg detect --seed S --seeds N`` (with ``--noise`` = ``eval.noise``)."""
        return list(range(self.cfg.seed, self.cfg.seed + self.cfg.seeds))

    def score_prompts(self, prompts: list[str], unet, scorer=None, encoder=None) -> dict[str, np.ndarray]:
        """norm/align/score of each prompt averaged over the fixed noise seeds
        (:func:`memreg.score.mean_scores`, as ``memreg detect``)."""
        c = self.cfg
        scorer = scorer or self._scorer(unet)
        encoder = encoder or prompt_encoder(self.components)
        return mean_scores(scorer, encoder, prompts, self.noise_seeds(), noise=c.noise, batch_size=c.batch_size)

    def run_detection(self, step: int, unet) -> tuple[dict[str, float], dict]:
        t0 = time.perf_counter()
        groups = self.groups()
        scorer = self._scorer(unet)

        encoder = prompt_encoder(self.components)
        results = {g: self.score_prompts([p.text for p in items], unet, scorer, encoder) for g, items in groups.items()}
        scalars: dict[str, float] = {}
        for g, res in results.items():
            scalars[tags.eval_count(g)] = float(len(groups[g]))
            for t in tags.SCORE_TERMS:
                for q, v in quantiles(res[t]).items():
                    scalars[tags.eval_stat(g, t, q)] = v
        rocs = {}
        for pos, neg in CONTRASTS:
            if pos in results and neg in results:
                name = f"{pos}_vs_{neg}"
                for t in tags.SCORE_TERMS:
                    auc, tpr, fpr_c, tpr_c = roc_metrics(results[pos][t], results[neg][t])
                    scalars[tags.eval_auc(name, t)] = auc
                    scalars[tags.eval_tpr(name, t)] = tpr
                    rocs.setdefault(name, {})[t] = (fpr_c, tpr_c, auc)
        scalars[tags.EVAL_SECONDS] = time.perf_counter() - t0
        self._log_scalars(scalars, step)
        writer = self._tb_writer()
        if writer is not None:
            for g, res in results.items():
                for t in tags.SCORE_TERMS:
                    writer.add_histogram(tags.eval_hist(g, t), res[t], step)
            if rocs:
                writer.add_figure(tags.EVAL_ROC, self._roc_figure(rocs, step), step, close=True)
            writer.add_text(tags.EVAL_TOP_K, self._top_k_table(groups, results), step)
            writer.flush()
        detail = {g: [{"prompt": p.text, "dup_count": p.dup_count, "record_id": p.record_id,
                       **{t: float(results[g][t][i]) for t in tags.SCORE_TERMS}} for i, p in enumerate(items)]
                  for g, items in groups.items()}
        logger.info("memorization eval at step %d: %s (%.1fs)", step,
                    ", ".join(f"{g} score {scalars[tags.eval_stat(g, 'score', 'mean')]:.3f}" for g in results),
                    scalars[tags.EVAL_SECONDS])
        return scalars, detail

    def _top_k_table(self, groups, results) -> str:
        rows = []
        for g in TRAINING_GROUPS:
            for i, p in enumerate(groups.get(g, [])):
                rows.append((results[g]["score"][i], results[g]["norm"][i], results[g]["align"][i], p))
        rows.sort(key=lambda r: -r[0])
        esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| rank | score | norm | align | duplicates | group | caption |",
                 "|---:|---:|---:|---:|---:|---|---|"]
        for k, (s, n, a, p) in enumerate(rows[:self.cfg.top_k], 1):
            lines.append(f"| {k} | {s:.4f} | {n:.4f} | {a:.4f} | {p.dup_count} | {p.group} | {esc(p.text)} |")
        if not rows:
            lines.append("| - | - | - | - | - | - | (no training captions scored) |")
        return "\n".join(lines)

    @staticmethod
    def _roc_figure(rocs: dict, step: int):

        fig = Figure(figsize=(4.2 * len(rocs), 4))
        for k, (name, curves) in enumerate(rocs.items()):
            ax = fig.add_subplot(1, len(rocs), k + 1)
            for t, (fpr, tpr, auc) in curves.items():
                ax.plot(fpr, tpr, label=f"{t} (AUC {auc:.3f})")
            ax.plot([0, 1], [0, 1], ls=":", c="gray")
            ax.set_title(f"{name.replace('_', ' ')} @ step {step}", fontsize=9)
            ax.set_xlabel("FPR")
            ax.set_ylabel("TPR")
            ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        return fig

    # ------------------------------------------------------------------ copy check
    def detector(self, device=None):
        if self._detector is None:

            self._detector = detector_from_config(self.cfg, device=device)
        return self._detector

    def _references(self, detector):
        """(features, record index per row, hash -> row) of each distinct training image; cached."""
        if self._refs is None:
            t = time.perf_counter()
            idx = self.dup_index
            rows = idx.first_of_each()
            feats = []
            for k in range(0, len(rows), 64):
                feats.append(detector.embed([load_rgb(self.train_records[i]["image"]) for i in rows[k:k + 64]]))
            feats_t = torch.cat(feats) if feats else torch.zeros(0)
            self._refs = (feats_t, rows, {idx.hashes[i]: r for r, i in enumerate(rows)})
            logger.info("memorization monitor: embedded %d distinct training images for the %s copy check in %.1fs",
                        len(rows), detector.name, time.perf_counter() - t)
        return self._refs

    def run_copy_check(self, step: int, unet) -> tuple[dict[str, float], dict]:
        """Generate from each group's prompts, match every image to the training set, and log it:
        (scalars, per-group detail records)."""
        t0 = time.perf_counter()
        check = self.copy_matches(unet)
        if check is None:
            return {}, {}
        scalars, detail = self.copy_summary(check)
        self._log_copy_check(step, check, scalars)
        scalars[tags.COPY_SECONDS] = time.perf_counter() - t0
        self._log_scalars(scalars, step)
        writer = self._tb_writer()
        if writer is not None:
            writer.flush()
        logger.info("copy check at step %d: %s (%.1fs)", step,
                    ", ".join(f"{g} memorized {scalars[tags.copy_stat(g, 'memorized_frac')]:.2f}" for g in detail),
                    scalars[tags.COPY_SECONDS])
        return scalars, detail

    def copy_matches(self, unet) -> "CopyCheck | None":
        """The computing half of the copy check (None when it cannot run): generations and their
        nearest and own training images under the copy detector."""
        c = self.cfg
        if not self.train_records:
            logger.warning("memorization monitor: no training records; copy check skipped")
            return None
        if self.components.vae is None:
            logger.warning("memorization monitor: components have no VAE; copy check skipped")
            return None
        device = next(unet.parameters()).device
        detector = self.detector(device)
        ref_feats, ref_rows, row_of_hash = self._references(detector)
        jobs = [(g, i, k, p) for g, items in self.groups().items() for i, p in enumerate(items[:c.max_generate_prompts])
                for k in range(c.num_images_per_prompt)]
        if not jobs:
            return None
        images = generation.generate_images(
            self.components, [j[3].text for j in jobs], [derive_seed("gen", c.seed, j[1], j[2]) for j in jobs],
            unet=unet, num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
            batch_size=c.batch_size)
        gen_feats = detector.embed(images)
        best, nearest = detector.nearest(gen_feats, ref_feats)
        own = torch.full((len(jobs),), float("nan"))
        own_rows: list[int | None] = []
        for n, (_, _, _, p) in enumerate(jobs):
            r = row_of_hash.get(p.image_hash) if p.image_hash is not None else None
            own_rows.append(None if r is None else ref_rows[r])
            if r is not None:
                own[n] = detector.similarity(gen_feats[n:n + 1], ref_feats[r:r + 1])[0, 0]
        return CopyCheck(jobs, images, best, [ref_rows[int(i)] for i in nearest], own, own_rows,
                         float(detector.threshold))

    def copy_summary(self, check: "CopyCheck") -> tuple[dict[str, float], dict]:
        """Per-group copy scalars (``copy/<group>/...``) and detail records of a :class:`CopyCheck`."""
        thr, best, own = check.threshold, check.best, check.own
        scalars: dict[str, float] = {tags.COPY_THRESHOLD: thr}
        detail: dict[str, list] = {}
        for g, sel in check.groups().items():
            sims = best[sel].numpy()
            scalars[tags.copy_stat(g, "memorized_frac")] = float((sims > thr).mean())
            scalars[tags.copy_stat(g, "sim_mean")] = float(sims.mean())
            scalars[tags.copy_stat(g, "sim_p95")] = float(np.percentile(sims, 95))
            own_g = own[sel].numpy()
            if np.isfinite(own_g).any():
                scalars[tags.copy_stat(g, "own_sim_mean")] = float(np.nanmean(own_g))
                scalars[tags.copy_stat(g, "own_memorized_frac")] = float(np.mean(own_g[np.isfinite(own_g)] > thr))
                scalars[tags.copy_stat(g, "own_sim_p95")] = float(np.nanpercentile(own_g, 95))
            detail[g] = [{"prompt": check.jobs[n][3].text, "image": check.jobs[n][2],
                          "similarity": float(best[n]), "memorized": bool(best[n] > thr),
                          "nearest_record_id": self.train_records[check.nearest_rows[n]].get("id", check.nearest_rows[n]),
                          "own_similarity": None if not np.isfinite(float(own[n])) else float(own[n])} for n in sel]
        return scalars, detail

    def _log_copy_check(self, step: int, check: "CopyCheck", scalars: dict[str, float]) -> None:
        """Similarity histograms and generation | nearest | own image grids, per group."""
        writer = self._tb_writer()
        if writer is None:
            return
        for g, sel in check.groups().items():
            writer.add_histogram(tags.copy_hist(g), check.best[sel].numpy(), step)
            rows = []
            for n in sel[:self.cfg.grid_rows]:
                near_img = load_rgb(self.train_records[check.nearest_rows[n]]["image"])
                own_row = check.own_rows[n]
                own_img = None if own_row is None else load_rgb(self.train_records[own_row]["image"])
                rows.append((check.images[n], near_img, own_img, float(check.best[n]),
                             None if own_img is None else float(check.own[n]), bool(check.best[n] > check.threshold),
                             check.jobs[n][3].text))
            writer.add_image(tags.copy_grid(g), np.asarray(copy_grid(rows, check.threshold)), step, dataformats="HWC")

    # ------------------------------------------------------------------ logging
    def _autocast(self):
        acc = self.accelerator
        if acc is not None and getattr(acc, "mixed_precision", "no") not in (None, "no"):
            return acc.autocast()
        return nullcontext()

    def _tb_writer(self):
        if self._writer_override is not None:
            return self._writer_override
        writer = None
        if self.accelerator is not None:
            try:
                writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            except ValueError:
                writer = None
            if not hasattr(writer, "add_histogram"):  # accelerate returns a blank tracker without trackers
                writer = None
        if writer is None and not self._warned_no_writer:
            logger.warning("memorization monitor: no TensorBoard tracker; histograms, figures, text and image grids "
                           "are not logged (use log_with='tensorboard')")
            self._warned_no_writer = True
        return writer

    def _log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.accelerator is not None:
            self.accelerator.log(dict(scalars), step=step)
        elif self._writer_override is not None:
            for k, v in scalars.items():
                self._writer_override.add_scalar(k, v, step)

    def _write_json(self, name: str, record: dict) -> None:
        if self.output_dir is None:
            return
        out = self.output_dir / "memorization"
        out.mkdir(parents=True, exist_ok=True)
        path = out / name
        if path.exists():
            logger.warning("memorization monitor: replacing %s (step %d evaluated again, e.g. after a resume)",
                           path, record["step"])
        path.write_text(json.dumps(record, indent=1, default=str))


def copy_grid(rows, threshold: float, cell: int = 96) -> Image.Image:
    """A PIL grid: one row per generation = [generation | nearest training image | own training image].

    ``rows``: (generation, nearest, own or None, similarity, own similarity or None, memorized,
    caption). Similarities are written under the images; memorized rows in red.
    """

    font = ImageFont.load_default()
    text_h, head_h = 26, 16
    width = 3 * cell + 4 * 4
    height = head_h + len(rows) * (cell + text_h + 4) + 4
    grid = Image.new("RGB", (width, max(height, head_h + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, title in enumerate(("generation", "nearest train", "own train")):
        draw.text((4 + k * (cell + 4), 2), title, fill=(0, 0, 0), font=font)
    for r, (gen, near, own, sim, own_sim, memorized, caption) in enumerate(rows):
        y = head_h + r * (cell + text_h + 4)
        for k, im in enumerate((gen, near, own)):
            x = 4 + k * (cell + 4)
            if im is None:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline=(200, 200, 200))
                draw.text((x + 4, y + cell // 2 - 6), "n/a", fill=(150, 150, 150), font=font)
            else:
                resample = Image.Resampling.NEAREST if max(im.size) < cell else Image.Resampling.BICUBIC
                grid.paste(im.convert("RGB").resize((cell, cell), resample), (x, y))
        color = (200, 0, 0) if memorized else (0, 0, 0)
        label = f"sim {sim:.3f}" + (" COPY" if memorized else "") + (f" | own {own_sim:.3f}" if own_sim is not None else "")
        draw.text((4, y + cell + 1), label, fill=color, font=font)
        draw.text((4, y + cell + 13), caption[:48], fill=(80, 80, 80), font=font)
    return grid
