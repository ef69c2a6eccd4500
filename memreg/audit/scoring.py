"""Per-caption anisotropy score under the base model, for the audit.

The one place the audit calls the shared scoring loop (:func:`memreg.score.score_prompts`, as
``memreg detect`` and the training monitor do), with shared noise per seed (``--noise shared``):
a caption's score depends on (caption, seeds) and on its batch only through float rounding, and
a shard's batches are the same whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memreg.models import check_model_path, load_components, parse_dtype

SCORE_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class ScoreSettings:
    model: str
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 16
    preset: str = "sd1"
    dtype: str | None = None


def check_model(model: str) -> None:
    """Fail early (``ModelError``, one line) if ``model`` is a local dir without the needed subfolders."""
    check_model_path(model, SCORE_SUBFOLDERS)


class CaptionScorer:
    """``scorer(captions) -> {caption: (norm, align, score)}`` with the model loaded once."""

    def __init__(self, settings: ScoreSettings, device: torch.device):
        from memreg.encoding import PromptEncoder
        from memreg.score import AnisotropyScore

        dtype = parse_dtype(settings.dtype or ("float16" if device.type == "cuda" else "float32"))
        self.comps = load_components(settings.model, dtype=dtype, device=device, with_vae=False)
        self.scorer = AnisotropyScore(self.comps.unet, self.comps.scheduler, preset=settings.preset)
        self.encoder = PromptEncoder(self.comps.tokenizer, self.comps.text_encoder, device=device)
        self.settings = settings

    def __call__(self, captions: list[str]) -> dict[str, tuple[float, float, float]]:
        from memreg.score import noise_latents, score_prompts

        if not captions:
            return {}
        s, unet, device = self.settings, self.comps.unet, self.encoder.device
        out = score_prompts(self.scorer, lambda texts: self.encoder.encode(texts).embeds, self.encoder.uncond(),
                            captions, lambda texts, lo, seed: noise_latents(unet, texts, seed, "shared", device=device),
                            draws=s.seeds, batch_size=s.batch_size, shared_noise=True)
        norm, align, score = (getattr(out, t).double().mean(dim=0).tolist() for t in ("norm", "align", "score"))
        return {c: (norm[k], align[k], score[k]) for k, c in enumerate(captions)}
