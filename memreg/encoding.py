"""Batched prompt encoding with an SD 1.x/2.x pipeline's CLIP tokenizer and text encoder.

Other families encode with their own encoder of the same interface (``memreg.families``: SDXL's
``SDXLPromptEncoder``); ``memreg.families.prompt_encoder(components)`` picks the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EncodedPrompts:
    embeds: Tensor  # (B, L, D) last hidden states, as SD's UNet consumes them (SDXL: a families.Conditioning)
    truncated: list[bool]  # prompt was longer than the tokenizer's max length


class PromptEncoder:
    """Encode prompts to UNet conditioning; the empty prompt is encoded once and cached."""

    def __init__(self, tokenizer, text_encoder, device=None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device if device is not None else text_encoder.device
        self.max_length = tokenizer.model_max_length
        self._uncond: Tensor | None = None

    def ids(self, prompts: list[str]) -> Tensor:
        """Padded, truncated ids (B, max_length)."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                              truncation=True, return_tensors="pt").input_ids

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, list[bool]]:
        """Padded, truncated ids (B, max_length) and which prompts were truncated."""
        full = self.tokenizer(list(prompts), truncation=False).input_ids
        return self.ids(prompts), [len(f) > self.max_length for f in full]

    def embed_ids(self, ids: Tensor, model=None) -> Tensor:
        return (model or self.text_encoder)(ids.to(self.device), return_dict=False)[0]

    def __call__(self, prompts: list[str], model=None) -> Tensor:
        """Embeddings with autograd as the caller has it (training); ``model`` overrides the
        text encoder (e.g. its DDP-wrapped, trained copy)."""
        return self.embed_ids(self.ids(prompts), model)

    def encode(self, prompts: list[str], batch_size: int | None = None) -> EncodedPrompts:
        ids, truncated = self.tokenize(prompts)
        step = batch_size or max(len(prompts), 1)
        with torch.no_grad():
            embeds = torch.cat([self.embed_ids(ids[i:i + step]) for i in range(0, len(prompts), step)])
        return EncodedPrompts(embeds, truncated)

    def uncond(self, fresh: bool = False) -> Tensor:
        """(1, L, D) embedding of the empty prompt, computed on first use (again if ``fresh``,
        when the text encoder is being trained)."""
        if self._uncond is None or fresh:
            self._uncond = self.encode([""]).embeds
        return self._uncond
