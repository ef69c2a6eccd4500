"""Per-caption anisotropy score under the base model, for the audit.

The audit's use of the one prompt-list scorer (:func:`memreg.score.mean_scores`, as ``memreg
detect`` and the training monitor), with shared noise per seed (``--noise shared``):
a caption's score depends on (caption, seeds) and on its batch only through float rounding, and
a shard's batches are the same whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memreg.families import prompt_encoder
from memreg.models import check_model_path, load_components, parse_dtype
from memreg.log_tags import SCORE_TERMS
from memreg.score import make_scorer, mean_scores

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
        dtype = parse_dtype(settings.dtype or ("float16" if device.type == "cuda" else "float32"))
        self.comps = load_components(settings.model, dtype=dtype, device=device, with_vae=False)
        self.scorer = make_scorer(self.comps.unet, self.comps.scheduler, preset=settings.preset)
        self.encoder = prompt_encoder(self.comps, device=device)
        self.settings = settings

    def __call__(self, captions: list[str]) -> dict[str, tuple[float, float, float]]:
        if not captions:
            return {}
        out = mean_scores(self.scorer, self.encoder, captions, self.settings.seeds, noise="shared",
                          batch_size=self.settings.batch_size)
        norm, align, score = (out[t].tolist() for t in SCORE_TERMS)
        return {c: (norm[k], align[k], score[k]) for k, c in enumerate(captions)}
