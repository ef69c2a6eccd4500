"""Per-caption references (``guard.reference``): what a caption's probe value is compared with.

The absolute threshold (``reference: none``) holds a probe's value ``s`` at a tau fixed on the base
model; fine-tuning moves every caption, so that tau is either never crossed or crossed by everyone.
The reference modes compare instead

* ``base``: the growth ``g = s - s_base``, ``s_base`` the base model's value for the same caption
  on the same probe noise, with ``reference_margin``;
* ``population``: ``s`` with a running robust threshold ``median + k * 1.4826 * MAD`` of the
  latest probe of each recently probed caption (gathered over processes), so drift shared by every
  caption does not fire, and a caption probed often (a duplicated one) counts once;
* ``base+population``: the growth ``g`` with ``max(reference_margin, median + k * 1.4826 * MAD)``
  of the captions' latest growths.

Base values come from one of two sources (``reference_source``):

* ``forward``: a no-grad forward of the probe inputs through ``ctx.reference_unet()`` (LoRA with
  the adapters disabled, or a frozen copy in ``ctx.reference``) on every active step, on the probe's
  own fresh noise: no calibration cost, one extra no-grad forward of the probe samples per step.
* ``cache``: at calibration (base model) every distinct training caption is scored on
  ``reference_draws`` fixed per-caption noises (:func:`~memreg.guards.anisotropy_gate.probes.caption_latents`),
  sharded over processes and gathered; a probe later picks one of those draws, so the trained
  forward sees the same noise as the cached value. It costs 4 bytes x draws per caption and one
  no-grad scoring pass over the captions, once.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from memreg import log_tags as tags
from memreg.duplicates import find_duplicates
from memreg.guards.anisotropy_gate.config import check_reference, uses_base, uses_population
from memreg.guards.anisotropy_gate.loss import Verdict, calib_scale
from memreg.guards.anisotropy_gate.probes import ProbeBatch, ProbeResult, ProbeSampler, caption_latents
from memreg.guards.anisotropy_gate.threshold import Calibration, Calibrator
from memreg.score import score_prompts

logger = logging.getLogger(__name__)

MAD_TO_SIGMA = 1.4826   # MAD of a normal distribution x this = its standard deviation


def _identity(t: Tensor) -> Tensor:
    return t


def distinct_captions(captions: Iterable) -> list[str]:
    """Every distinct non-empty caption string (entries may be lists of captions), first-seen order."""
    out: dict[str, None] = {}
    for c in captions:
        for s in ([c] if isinstance(c, str) else list(c)):
            if s and s.strip():
                out[s] = None
    return list(out)


def duplicated_captions(records: Sequence[dict], min_count: int = 2, clusters_from=None,
                        index=None) -> frozenset[str]:
    """Captions of training records whose image occurs >= ``min_count`` times (the monitor's
    duplicate finder, :func:`memreg.duplicates.find_duplicates`, or its ``index`` of ``records``
    when the caller built it already); every caption of such a record."""
    index = index if index is not None else find_duplicates(records, clusters_from=clusters_from)
    return frozenset(distinct_captions(r.get("caption") or "" for i, r in enumerate(records)
                                       if index.count(i) >= min_count))


class BaseReferenceCache:
    """caption -> base-model values on its ``draws`` fixed noises (``cache`` source)."""

    def __init__(self, draws: int, seed: int):
        self.draws, self.seed = int(draws), int(seed)
        self.captions: list[str] = []
        self.values = torch.zeros(0, self.draws)
        self._row: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.captions)

    def set(self, captions: list[str], values: Tensor) -> None:
        if values.shape != (len(captions), self.draws):
            raise ValueError(f"reference cache: values {tuple(values.shape)} do not match "
                             f"{len(captions)} captions x {self.draws} draws")
        self.captions, self.values = list(captions), values.float().cpu()
        self._row = {c: i for i, c in enumerate(self.captions)}

    def build(self, captions: list[str], score: Callable[[list[str]], Tensor], process_index: int = 0,
              num_processes: int = 1, gather: Callable[[Tensor], Tensor] | None = None, device=None) -> None:
        """``score(captions) -> (draws, n)`` base values; each process scores every P-th caption
        (the list padded to a multiple of P) and ``gather`` puts the shards together (on ``device``)."""
        n, p = len(captions), max(int(num_processes), 1)
        padded = captions + [captions[-1]] * ((-n) % p) if n else []
        mine = padded[process_index::p]
        vals = score(mine).T.contiguous() if mine else torch.zeros(0, self.draws)   # (m, draws)
        if p > 1:
            m = len(padded) // p
            vals = gather(vals.reshape(-1).float().to(device or "cpu")).cpu().reshape(p, m, self.draws).transpose(0, 1)
        self.set(captions, vals.reshape(-1, self.draws)[:n])

    def lookup(self, captions: Sequence[str], draw: Tensor) -> tuple[Tensor, Tensor]:
        """(values, known) per caption: its cached value on draw ``draw[i]``; unknown captions 0, False."""
        rows = [self._row.get(c, -1) for c in captions]
        known = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
        vals = torch.tensor([float(self.values[r, int(d)]) if r >= 0 else 0.0 for r, d in zip(rows, draw)])
        return vals, known

    def state_dict(self) -> dict:
        return {"captions": list(self.captions), "values": self.values.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.set(list(state["captions"]), state["values"])


class PopulationThreshold:
    """Running ``median + k * 1.4826 * MAD`` over the last ``window`` values (+inf before ``min_count``).

    With caption ``keys`` the population is one value per caption, its latest: a caption probed
    often (a duplicated one) would otherwise fill the window with its own values and lift the
    threshold over itself."""

    def __init__(self, k: float = 3.0, window: int = 256, min_count: int = 16):
        self.k, self.window, self.min_count = float(k), int(window), int(min_count)
        self.buffer = torch.zeros(0, dtype=torch.float64)
        self.keys = torch.zeros(0, dtype=torch.int64)   # caption key per value; -1: none (never replaced)

    def threshold(self) -> float:
        if self.buffer.numel() < max(self.min_count, 1):
            return math.inf
        med = torch.quantile(self.buffer, 0.5)
        mad = torch.quantile((self.buffer - med).abs(), 0.5)
        return float(med + self.k * MAD_TO_SIGMA * mad)

    def update(self, values: Tensor, keys: Tensor | None = None) -> None:
        """Append this step's values (already gathered over processes, so every process agrees); a
        keyed value replaces its caption's earlier one."""
        v = values.detach().double().cpu().reshape(-1)
        k = torch.full(v.shape, -1, dtype=torch.int64) if keys is None else keys.detach().long().cpu().reshape(-1)
        ok = torch.isfinite(v)
        v, k = v[ok], k[ok]
        if keys is not None and k.numel():
            last = {int(key): i for i, key in enumerate(k.tolist())}   # a caption twice in one step: its last value
            idx = torch.tensor(sorted(last.values()), dtype=torch.long)
            v, k = v[idx], k[idx]
            stale = torch.isin(self.keys, k)
            self.buffer, self.keys = self.buffer[~stale], self.keys[~stale]
        self.buffer = torch.cat([self.buffer, v])[-self.window:]
        self.keys = torch.cat([self.keys, k])[-self.window:]

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.clone(), "keys": self.keys.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = state["buffer"].double().cpu().reshape(-1)
        keys = state.get("keys")
        self.keys = (torch.full(self.buffer.shape, -1, dtype=torch.int64) if keys is None
                     else keys.long().cpu().reshape(-1))


def build_base_cache(cache: BaseReferenceCache, ctx, probes: ProbeSampler) -> None:
    """Score every distinct training caption on its fixed noises under the current (base) model."""
    caps = distinct_captions(ctx.train_captions)
    if not caps:
        raise ValueError("guard.reference needs training captions for its base-value cache")

    def noise(batch: list[str], lo: int, d: int) -> Tensor:
        return caption_latents(batch, [d] * len(batch), cache.draws, cache.seed, ctx.latent_shape)

    def score(chunk: list[str]) -> Tensor:   # (draws, n) base values on the per-caption noise
        so = score_prompts(probes.scorer, ctx.encode, ctx.uncond(), chunk, noise, draws=range(cache.draws),
                           batch_size=ctx.batch_size, terms=probes.terms, run_unet=ctx.run_unet)
        return probes.values_norms(so)[0]

    cache.build(caps, score, ctx.process_index, ctx.num_processes, ctx.gather,
                device=getattr(ctx.unet, "device", None))
    if ctx.is_main:
        logger.info("penalty reference: base values of %d training captions x %d fixed noise draws cached",
                    len(cache), cache.draws)


class Reference:
    """A reference mode's threshold (:class:`~memreg.guards.anisotropy_gate.threshold.Threshold`): the
    base cache (``cache`` source), the population threshold and the margin; :meth:`threshold` is
    the bar the quantity (growth, or the value for ``population``) must clear. ``source``: the
    resolved base-value source, ``cache`` or ``forward``."""

    def __init__(self, mode: str, source: str = "cache", draws: int = 2, margin: float = 0.0, k: float = 3.0,
                 window: int = 256, min_count: int = 16, seed: int = 0, zscore: str = "none",
                 calibrator: Calibrator | None = None, gather: Callable[[Tensor], Tensor] = _identity):
        check_reference(mode, source)
        if mode == "none" or source == "auto":
            raise ValueError(f"a Reference needs a reference mode and a resolved source, got {mode!r}, {source!r}")
        self.mode, self.source, self.margin = mode, source, float(margin)
        self.zscore, self.calibrator, self.gather = zscore, calibrator, gather
        self.cache = BaseReferenceCache(draws, seed) if uses_base(mode) and source == "cache" else None
        self.population = PopulationThreshold(k, window, min_count) if uses_population(mode) else None

    @classmethod
    def from_config(cls, cfg, ctx, calibrator: Calibrator) -> "Reference":
        """``source: auto`` -> ``cache`` (LoRA too: a per-step reference forward with the adapters
        off costs more step time than the one calibration pass, see README), ``forward`` when the
        trainer hands over a frozen copy (``ctx.reference``)."""
        source = cfg.reference_source
        if source == "auto":
            source = "forward" if ctx.reference is not None else "cache"
        return cls(cfg.reference, source, draws=cfg.reference_draws, margin=cfg.reference_margin, k=cfg.population_k,
                   window=cfg.population_window, min_count=cfg.population_min, seed=ctx.seed, zscore=cfg.zscore,
                   calibrator=calibrator, gather=ctx.gather)

    @property
    def calibration(self) -> Calibration | None:
        return None if self.calibrator is None else self.calibrator.calibration

    @property
    def wants_keys(self) -> bool:
        """The population is keyed by caption, one value each."""
        return self.population is not None

    @property
    def fixed_noise(self) -> BaseReferenceCache | None:
        return self.cache

    def threshold(self) -> float:
        if self.population is None:
            return self.margin
        pop = self.population.threshold()
        return pop if self.mode == "population" else max(self.margin, pop)

    def calibrate(self, ctx, probes: ProbeSampler) -> None:
        """The base values of every training caption, unless resumed."""
        if self.cache is not None and not len(self.cache):
            build_base_cache(self.cache, ctx, probes)

    def attach(self, probe: ProbeBatch, ctx, probes: ProbeSampler) -> None:
        """(k,) base values of the probes on their own noise (``probe.base``), and which exist."""
        k = probe.index.numel()
        if self.cache is not None:
            probe.base, probe.known = self.cache.lookup(probe.captions, probe.draw)
        elif self.mode == "population":
            probe.base, probe.known = torch.zeros(k), torch.ones(k, dtype=torch.bool)
        else:
            with torch.no_grad(), ctx.reference_unet() as unet:   # source forward: adapters off / frozen copy
                out = ctx.run_unet(probe.sample, probe.timesteps, probe.embeds, unet=unet)
            probe.base = probes.values_from_output(out, probe.latents)[0].float().cpu()
            probe.known = torch.ones(k, dtype=torch.bool)

    def compare(self, values: Tensor, probe: ProbeBatch) -> Verdict:
        """``value - base`` against :meth:`threshold` (taken before this step's probes join the
        population, so every process uses the same one); probes without a base value never fire."""
        known = probe.known.to(values.device)
        quantity = values - probe.base.to(values.device, values.dtype)
        bar = self.threshold()
        return Verdict(quantity=quantity, bar=bar, over=(quantity.detach() > bar) & known, values=values.detach(),
                       known=known, scale=calib_scale(self.zscore, self.calibration),
                       growth=torch.where(known, quantity.detach(), torch.full_like(quantity, math.nan)))

    def update(self, verdict: Verdict, keys: Tensor | None) -> None:
        """The step's growths join the population (``keys``: every process's caption keys, gathered)."""
        if self.population is not None:
            self.population.update(self.gather(verdict.growth.float().contiguous()), keys)

    def logs(self, results: Sequence[ProbeResult]) -> dict[str, float]:
        out = {tags.GUARD_THRESHOLD: self.threshold()}
        growth = self.gather(torch.cat([r.growth for r in results]).float()).cpu()
        if bool(torch.isfinite(growth).any()):
            out[tags.GUARD_GROWTH_MEAN] = float(growth[torch.isfinite(growth)].mean())
        return out

    def under(self, over: Tensor) -> Tensor:
        """The conditioning ratio is taken over the probes that did not fire."""
        return over == 0

    def describe(self) -> str:
        return f"; reference {self.mode}" + ("" if self.mode == "population" else f" (base values: {self.source})")

    def state_dict(self) -> dict:
        return {"cache": None if self.cache is None else self.cache.state_dict(),
                "population": None if self.population is None else self.population.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.cache is not None and state.get("cache") is not None:
            self.cache.load_state_dict(state["cache"])
        if self.population is not None and state.get("population") is not None:
            self.population.load_state_dict(state["population"])
