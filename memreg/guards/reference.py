"""Per-caption references for the penalty (``guard.reference``): what a caption's value is compared with.

The absolute penalty (``reference: none``) thresholds a probe's value ``s`` (score, or ``g1*norm``
for ``term: norm``) at a tau fixed on the base model; fine-tuning moves every caption, so that tau
is either never crossed or crossed by everyone. The reference modes penalise instead

* ``base``: the growth ``g = s - s_base``, ``s_base`` the base model's value for the same caption
  on the same probe noise, above ``reference_margin``;
* ``population``: ``s`` above a running robust threshold ``median + k * 1.4826 * MAD`` of the
  latest probe of each recently probed caption (gathered over processes), so drift shared by every
  caption is not penalised, and a caption probed often (a duplicated one) counts once;
* ``base+population``: the growth ``g`` above ``max(reference_margin, median + k * 1.4826 * MAD)``
  of the captions' latest growths (the default, with the caption gate: ``memreg.guards.gate``).

Base values come from one of two sources (``reference_source``):

* ``forward``: a no-grad forward of the probe inputs through ``ctx.reference_unet()`` (LoRA with
  the adapters disabled, or a frozen copy in ``ctx.reference``) on every active step: the probe's
  own fresh noise, no calibration cost, one extra no-grad forward of the probe samples per active
  step (no backward: about a third of the probe's forward+backward cost).
* ``cache``: full fine-tuning without a frozen copy. At calibration (base model) every distinct
  training caption is scored on ``reference_draws`` fixed per-caption noises (draw ``d`` of a
  caption = the d-th N(0, I) latent of a generator seeded with ``memreg.score.prompt_seed(seed,
  caption)``), sharded over processes and gathered; a probe later picks one of those draws, so the
  trained forward sees the same noise as the cached value. Memory: 4 bytes x draws per caption
  (1M captions x 2 draws = 8 MB, plus the caption strings in the checkpoint); time: captions x
  draws x 2 no-grad UNet evaluations for ``term: norm`` (x4 for ``combined``), once.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from memreg.score import prompt_seed

REFERENCES = ("none", "base", "population", "base+population")
SOURCES = ("auto", "cache", "forward")
MAD_TO_SIGMA = 1.4826   # MAD of a normal distribution x this = its standard deviation


def uses_base(reference: str) -> bool:
    return reference in ("base", "base+population")


def uses_population(reference: str) -> bool:
    return reference in ("population", "base+population")


def caption_latents(captions: Sequence[str], draw: Tensor | Sequence[int], draws: int, seed: int,
                    shape: Sequence[int]) -> Tensor:
    """(n, *shape) float32: for caption i, draw ``draw[i]`` of its ``draws`` fixed per-caption noises."""
    out = []
    for cap, d in zip(captions, [int(x) for x in draw]):
        gen = torch.Generator("cpu").manual_seed(prompt_seed(seed, cap))
        out.append(torch.randn((draws, *shape), generator=gen, dtype=torch.float32)[d])
    return torch.stack(out) if out else torch.zeros(0, *shape)


def distinct_captions(captions: Iterable) -> list[str]:
    """Every distinct non-empty caption string (entries may be lists of captions), first-seen order."""
    out: dict[str, None] = {}
    for c in captions:
        for s in ([c] if isinstance(c, str) else list(c)):
            if s and s.strip():
                out[s] = None
    return list(out)


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
    often (a duplicated one, in 40% of the demo's batches) would otherwise fill the window with its
    own values and lift the threshold over itself."""

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


def fire_rates(over: Tensor, duplicated: Tensor) -> dict[str, float]:
    """Fraction of probes over the threshold among duplicated and among ordinary captions
    (a group without probes is left out)."""
    over, duplicated = over.bool().cpu(), duplicated.bool().cpu()
    out = {}
    for group, mask in (("duplicated", duplicated), ("ordinary", ~duplicated)):
        if bool(mask.any()):
            out[group] = float(over[mask].float().mean())
    return out


def duplicated_captions(records: Sequence[dict], min_count: int = 2, clusters_from=None,
                        index=None) -> frozenset[str]:
    """Captions of training records whose image occurs >= ``min_count`` times (the monitor's
    duplicate finder, :func:`memreg.duplicates.find_duplicates`, or its ``index`` of ``records``
    when the caller built it already); every caption of such a record."""
    from memreg.duplicates import find_duplicates

    index = index if index is not None else find_duplicates(records, clusters_from=clusters_from)
    return frozenset(distinct_captions(r.get("caption") or "" for i, r in enumerate(records)
                                       if index.count(i) >= min_count))


class Reference:
    """A reference mode's state: the base cache (``cache`` source), the population threshold and
    the margin; :meth:`threshold` is the bar the penalised quantity must clear."""

    def __init__(self, mode: str, source: str = "cache", draws: int = 2, margin: float = 0.0, k: float = 3.0,
                 window: int = 256, min_count: int = 16, seed: int = 0):
        if mode not in REFERENCES or mode == "none":
            raise ValueError(f"reference must be one of {REFERENCES[1:]}, got {mode!r}")
        if source not in ("cache", "forward"):
            raise ValueError(f"reference source must be 'cache' or 'forward', got {source!r}")
        self.mode, self.source, self.margin = mode, source, float(margin)
        self.cache = BaseReferenceCache(draws, seed) if uses_base(mode) and source == "cache" else None
        self.population = PopulationThreshold(k, window, min_count) if uses_population(mode) else None

    def threshold(self) -> float:
        if self.population is None:
            return self.margin
        pop = self.population.threshold()
        return pop if self.mode == "population" else max(self.margin, pop)

    def state_dict(self) -> dict:
        return {"cache": None if self.cache is None else self.cache.state_dict(),
                "population": None if self.population is None else self.population.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.cache is not None and state.get("cache") is not None:
            self.cache.load_state_dict(state["cache"])
        if self.population is not None and state.get("population") is not None:
            self.population.load_state_dict(state["population"])
