"""Training-time memorization baselines the guard is compared against.

* :class:`WenFilter` - Wen et al., ICLR'24, "Detecting, Explaining, and Mitigating Memorization in
  Diffusion Models", training mitigation (their ``--hard_threshold``): per sample, with no grad,
  ``||eps(x_t, t, c) - eps(x_t, t, u)||_2`` on the sample's own noisy latent and timestep (``c``
  the caption, ``u`` the empty prompt; the conditional prediction is the training forward's own
  output). Samples with a norm ``>= tau`` are removed from the loss (MSE averaged over the kept
  ones); if every sample is removed, the step is skipped. v-prediction outputs are converted to
  eps first.
* :class:`CaptionNoise` - Somepalli et al., NeurIPS'23, "Understanding and Mitigating Copying in
  Diffusion Models", DCR code: ``randwordadd`` (with probability ``word_prob`` a caption gets
  ``num_words`` random vocabulary tokens, each decoded and inserted at a random word position)
  and ``rand_noise_lam`` (``embeds + lambda * N(0, I)`` on the text-encoder output).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from memreg.score import guidance_norm, to_epsilon


class WenFilter:
    """Per-sample drop rule. ``tau``: a number or ``"auto"`` (q-quantile of base-model norms)."""

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str, tau: float | str = "auto",
                 tau_quantile: float = 0.95):
        if not (tau == "auto" or isinstance(tau, (int, float))):
            raise ValueError(f"tau must be a number or 'auto', got {tau!r}")
        self.alphas_cumprod = alphas_cumprod.detach().float().cpu()
        self.prediction_type = prediction_type
        self.tau_spec = tau
        self.tau: float | None = None if tau == "auto" else float(tau)
        self.tau_quantile = float(tau_quantile)

    @torch.no_grad()
    def norms(self, cond_pred: Tensor, uncond_pred: Tensor, noisy: Tensor, timesteps: Tensor) -> Tensor:
        """||eps_c - eps_u|| per sample (fp32, no grad)."""
        ab = self.alphas_cumprod[timesteps.long().cpu()].to(noisy.device)
        x = noisy.float()
        eps_c = to_epsilon(cond_pred.detach().float(), x, ab, self.prediction_type)
        eps_u = to_epsilon(uncond_pred.detach().float(), x, ab, self.prediction_type)
        return guidance_norm(eps_c - eps_u)

    def keep(self, norms: Tensor) -> Tensor:
        if self.tau is None:
            raise RuntimeError("WenFilter tau='auto' is not calibrated; call calibrate() first")
        return norms < self.tau

    @staticmethod
    def masked_loss(per_sample: Tensor, keep: Tensor) -> Tensor | None:
        """Mean loss over the kept samples; None when nothing is kept (skip the step)."""
        if not bool(keep.any()):
            return None
        k = keep.to(per_sample.dtype)
        return (per_sample * k).sum() / k.sum()

    def calibrate(self, norms: Tensor) -> float:
        """Set tau (if auto) to the q-quantile of base-model norms; returns tau."""
        if self.tau_spec == "auto":
            self.tau = float(torch.quantile(norms.detach().double().cpu(), self.tau_quantile))
        return float(self.tau)

    def state_dict(self) -> dict:
        return {"tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.tau = None if state.get("tau") is None else float(state["tau"])


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
        return embeds + self.embed_noise * torch.randn_like(embeds)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
