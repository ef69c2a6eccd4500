"""``guard.gate``: the probes' verdicts remembered per caption, acting on every batch.

The probes see a few captions every few steps, while the denoising loss fits every sample of every
batch, so a duplicated caption is pulled back toward its image far more often than it is probed.
The gate remembers which captions a probe found over the threshold (the threshold's own ``over``:
absolute tau, or the reference's) and, on every batch, gives their samples the weight
``gate_weight`` in the denoising loss (0: dropped; the loss is the weighted mean over the batch, as
Wen's filter takes the mean over kept samples). A flagged caption stays flagged until a probe of it
comes back under the threshold (``gate_release: true``) or for the rest of the run (``false``).
Memorization needs repetition, so the captions at risk are exactly the ones that come back to be
probed; an ordinary caption flagged by chance loses one sample per epoch.

What a flag names (``guard.gate_key``): ``image`` (default) the training image of the probed row, as
its item key (the exact-pixel hash, or the audit cluster with ``eval.duplicates_from``), so every row
of that image leaves the loss whatever caption it is drawn with (other wordings, a caption list,
shuffled or dropped tags, ``""``); ``caption`` the exact caption string. Keys are 63-bit
(:func:`memreg.keys.text_key`), so the flags gather across processes as int64 tensors and fit in a
checkpoint (8 bytes per flag).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from memreg.errors import MemregError
from memreg.guards.anisotropy_gate.config import check_gate_weight
from memreg.keys import text_key


class GateKeyError(MemregError, ValueError):
    """A checkpoint's gate flags name other things (captions, images) than this run's gate."""


def caption_keys(captions: Sequence[str]) -> Tensor:
    """(n,) int64 keys of the captions (the same on every process and run)."""
    return torch.tensor([text_key(c) for c in captions], dtype=torch.int64)


class CaptionGate:
    """The flagged captions and the per-sample weights they give. ``weight``: a flagged sample's
    weight in the denoising loss; ``release``: a probe under the threshold unflags its caption."""

    def __init__(self, weight: float = 0.0, release: bool = False, key: str = "image"):
        check_gate_weight(weight)
        self.weight = float(weight)
        self.release = bool(release)
        self.key = key
        self.flagged: set[int] = set()

    def update(self, keys: Tensor, over: Tensor) -> None:
        """Record probe verdicts (every process passes the same gathered ``keys``/``over``, in order)."""
        for k, o in zip(keys.tolist(), over.bool().tolist()):
            if o:
                self.flagged.add(k)
            elif self.release:
                self.flagged.discard(k)

    def is_flagged(self, keys: Tensor) -> Tensor:
        return torch.tensor([k in self.flagged for k in keys.tolist()], dtype=torch.bool)

    def weights(self, keys: Tensor) -> Tensor:
        """(n,) float32 denoising-loss weights: ``weight`` for flagged captions, 1 otherwise."""
        flagged = self.is_flagged(keys)
        return torch.where(flagged, torch.tensor(self.weight), torch.tensor(1.0))

    @staticmethod
    def weighted_mean(per_sample: Tensor, w: Tensor) -> Tensor:
        """sum(w * loss) / sum(w); when every weight is 0, a zero that keeps the graph (DDP)."""
        w = w.to(per_sample.device, per_sample.dtype)
        total = w.sum()
        if float(total) == 0.0:
            return (per_sample * 0).sum()
        return (per_sample * w).sum() / total

    def state_dict(self) -> dict:
        return {"flagged": torch.tensor(sorted(self.flagged), dtype=torch.int64), "key": self.key}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("key", "caption")   # checkpoints written before the image key flagged captions
        if saved != self.key:
            raise GateKeyError(f"the checkpoint's gate flags {saved}s, this run's gate flags {self.key}s; resume "
                               f"with guard.gate_key: {saved}")
        self.flagged = set(state["flagged"].tolist())
