"""``guard.type: caption_noise``: Somepalli et al., NeurIPS'23, "Understanding and Mitigating Copying
in Diffusion Models", DCR code: ``randwordadd`` (with probability ``word_prob`` a caption gets
``num_words`` random vocabulary tokens, each decoded and inserted at a random word position) and
``rand_noise_lam`` (``embeds + lambda * N(0, I)`` on the text-encoder output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from memreg.config_schema import ConfigError
from memreg.families import embeds_of, with_embeds
from memreg.guards.base import Guard, GuardContext


@dataclass
class CaptionNoiseConfig:
    """``guard.caption_noise.*`` (their ``randwordadd`` / ``rand_noise_lam``)."""

    word_prob: float = 0.1                # probability that a caption gets random words inserted
    num_words: int = 2                    # random vocabulary words inserted at random positions
    embed_noise: float = 0.0              # lambda of lambda * N(0, I) added to the text embeddings

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not 0.0 <= self.word_prob <= 1.0 or self.num_words < 0 or self.embed_noise < 0:
            raise ConfigError("guard.caption_noise: word_prob in [0, 1], num_words >= 0, embed_noise >= 0")


def insert_word(sentence: str, word: str, rng: np.random.Generator) -> str:
    """Insert ``word`` at a uniformly random word boundary (DCR's ``insert_rand_word``)."""
    words = sentence.split(" ")
    words.insert(int(rng.integers(0, len(words) + 1)), word)
    return " ".join(words)


class CaptionNoise:
    """Random word insertion (own numpy generator) and Gaussian text-embedding noise.

    ``vocab_size``: token ids are drawn from ``[0, min(vocab_size, 49400))`` as in DCR, skipping
    ``special_ids``; ``decode(id) -> str`` turns an id into text. The embedding noise draws from
    the training RNG (``torch.randn_like``), as DCR does.
    """

    def __init__(self, decode, vocab_size: int, special_ids: Sequence[int] = (), word_prob: float = 0.1,
                 num_words: int = 2, embed_noise: float = 0.0, seed: int = 0):
        self.decode = decode
        self.vocab_hi = int(min(vocab_size, 49400))
        self.special = set(int(i) for i in special_ids)
        self.word_prob = float(word_prob)
        self.num_words = int(num_words)
        self.embed_noise = float(embed_noise)
        self.rng = np.random.default_rng(int(seed))

    @classmethod
    def from_tokenizer(cls, tokenizer, **kw) -> "CaptionNoise":
        return cls(lambda i: tokenizer.decode([i]), len(tokenizer), tokenizer.all_special_ids, **kw)

    def _random_word(self) -> str:
        while True:
            tok = int(self.rng.integers(0, self.vocab_hi))
            if tok not in self.special:
                word = self.decode(tok).strip()
                if word:
                    return word

    def captions(self, captions: Sequence[str]) -> list[str]:
        out = []
        for cap in captions:
            if self.num_words > 0 and self.rng.uniform() <= self.word_prob:
                for _ in range(self.num_words):
                    cap = insert_word(cap, self._random_word(), self.rng)
            out.append(cap)
        return out

    def embeds(self, embeds: Tensor) -> Tensor:
        if self.embed_noise <= 0:
            return embeds
        e = embeds_of(embeds)   # the text embeddings; a family's added conditioning is left as it is
        return with_embeds(embeds, e + self.embed_noise * torch.randn_like(e))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class CaptionNoiseGuard(Guard):
    """:class:`CaptionNoise` behind the guard protocol (its word generator differs per process)."""

    name = "caption_noise"

    def __init__(self, ctx: GuardContext, noise: CaptionNoise):
        super().__init__(ctx)
        self.noise = noise

    @classmethod
    def from_config(cls, cfg, ctx: GuardContext) -> "CaptionNoiseGuard":
        c = cfg.caption_noise
        return cls(ctx, CaptionNoise.from_tokenizer(ctx.tokenizer, word_prob=c.word_prob, num_words=c.num_words,
                                                    embed_noise=c.embed_noise, seed=ctx.seed + 7919 * ctx.process_index))

    def describe(self) -> str:
        n = self.noise
        return f"caption_noise: {n.num_words} random words with p={n.word_prob}, embedding noise {n.embed_noise}"

    def captions(self, captions: list[str]) -> list[str]:
        return self.noise.captions(captions)

    def embeds(self, embeds: Tensor) -> Tensor:
        return self.noise.embeds(embeds)

    def state_dict(self) -> dict:
        return self.noise.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.noise.load_state_dict(state)
