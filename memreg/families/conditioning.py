"""What a denoiser is conditioned on: text embeddings plus a family's added conditioning.

SD 1.x/2.x condition the UNet on the text encoder's hidden states alone, and a plain ``(B, L, D)``
tensor stays their conditioning (so their numbers are the ones memreg computed before the family
seam). SDXL adds per-sample vectors that the UNet takes as ``added_cond_kwargs`` (the pooled text
embedding ``text_embeds`` and the micro-conditioning ``time_ids``): :class:`Conditioning` carries
them row-aligned with the embeddings, and every batching operation (slicing, indexing, expanding,
concatenating, casting) applies to all of its fields, so a fused forward (the score's four halves,
the guard's probes appended to the training batch) keeps each row's added conditioning with it.

:func:`denoise` is the one denoiser call every module makes: ``unet(x, t, **unet_kwargs(cond))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    """``embeds`` (B, L, D) cross-attention states and ``added`` {name: (B, ...)} added conditioning.

    Tensor-like where the library needs it: ``shape``/``dtype``/``device`` are the embeddings',
    ``cond[rows]`` and ``expand``/``to``/``detach``/``float`` act on every field. A dtype cast
    casts the added conditioning too (as diffusers' SDXL pipeline casts ``time_ids`` to the
    embeddings' dtype).
    """

    embeds: Tensor
    added: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        b = self.embeds.shape[0]
        for k, v in self.added.items():
            if v.shape[0] != b:
                raise ValueError(f"added conditioning {k!r} has batch {v.shape[0]}, the embeddings {b}")

    # -- tensor-like views
    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    @property
    def requires_grad(self) -> bool:
        return self.embeds.requires_grad

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def map(self, fn) -> "Conditioning":
        """``fn`` applied to the embeddings and to every added field."""
        return Conditioning(fn(self.embeds), {k: fn(v) for k, v in self.added.items()})

    def __getitem__(self, rows) -> "Conditioning":
        if isinstance(rows, tuple):
            raise TypeError("index a Conditioning by rows only")
        return self.map(lambda t: t[rows])

    def expand(self, batch: int, *rest) -> "Conditioning":
        return Conditioning(self.embeds.expand(batch, *rest),
                            {k: v.expand(batch, *v.shape[1:]) for k, v in self.added.items()})

    def repeat_interleave(self, repeats: int, dim: int = 0) -> "Conditioning":
        if dim != 0:
            raise ValueError("a Conditioning repeats along its rows (dim 0) only")
        return self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, *args, **kwargs) -> "Conditioning":
        if args and isinstance(args[0], Conditioning):
            args = (args[0].embeds,) + args[1:]
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "Conditioning":
        return self.map(Tensor.detach)

    def float(self) -> "Conditioning":
        return self.map(Tensor.float)

    def clone(self) -> "Conditioning":
        return self.map(Tensor.clone)


Cond = Union[Tensor, Conditioning]


def cat_conditioning(items: Sequence[Cond]) -> Cond:
    """Row-wise concatenation; plain tensors give ``torch.cat`` (bit for bit), conditionings are
    concatenated field by field (they must carry the same added fields)."""
    items = list(items)
    if all(isinstance(c, Tensor) for c in items):
        return torch.cat(items)
    if not all(isinstance(c, Conditioning) for c in items):
        raise TypeError("cannot concatenate plain embeddings with a conditioning that has added inputs")
    keys = set(items[0].added)
    if any(set(c.added) != keys for c in items):
        raise ValueError(f"conditionings with different added fields: {[sorted(c.added) for c in items]}")
    return Conditioning(torch.cat([c.embeds for c in items]),
                        {k: torch.cat([c.added[k] for c in items]) for k in items[0].added})


def embeds_of(cond: Cond) -> Tensor:
    """The (B, L, D) text embeddings of ``cond``."""
    return cond.embeds if isinstance(cond, Conditioning) else cond


def with_embeds(cond: Cond, embeds: Tensor) -> Cond:
    """``cond`` with its text embeddings replaced (its added conditioning kept)."""
    return Conditioning(embeds, dict(cond.added)) if isinstance(cond, Conditioning) else embeds


MICRO_CONDITIONING = ("time_ids",)   # added inputs that describe the sample (SDXL's sizes and crop), not the prompt


def unconditional_for(uncond: Cond, cond: Cond) -> Cond:
    """The empty prompt's conditioning for every row of ``cond``: the text parts of ``uncond`` (one
    row, expanded) and each row's own micro-conditioning (:data:`MICRO_CONDITIONING`) from ``cond``,
    as diffusers' SDXL pipeline pairs its negative prompt with the positive prompt's time ids; the
    guidance ``eps(c) - eps(empty)`` then differs in the prompt only. Plain tensors: the expansion."""
    n = len(cond)
    out = uncond.expand(n, *uncond.shape[1:])
    if not isinstance(out, Conditioning) or not isinstance(cond, Conditioning):
        return out
    added = dict(out.added)
    for key in MICRO_CONDITIONING:
        if key in added and key in cond.added:
            added[key] = cond.added[key].to(added[key])
    return Conditioning(out.embeds, added)


def unet_kwargs(cond: Cond) -> dict[str, Any]:
    """The UNet keyword arguments of ``cond``: ``encoder_hidden_states`` and, when it has added
    conditioning, ``added_cond_kwargs``."""
    if isinstance(cond, Conditioning):
        return {"encoder_hidden_states": cond.embeds, "added_cond_kwargs": dict(cond.added)}
    return {"encoder_hidden_states": cond}


def denoise(unet, sample: Tensor, timesteps, cond: Cond, **kwargs):
    """``unet(sample, timesteps, ...)`` conditioned on ``cond`` (``kwargs``: e.g. ``return_dict``)."""
    return unet(sample, timesteps, **unet_kwargs(cond), **kwargs)
