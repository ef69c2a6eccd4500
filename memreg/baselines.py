"""Moved to :mod:`memreg.guards` (``wen_filter``, ``caption_noise``, ``agc``); this name keeps old imports working."""

from memreg.guards.caption_noise import CaptionNoise, insert_word  # noqa: F401
from memreg.guards.wen_filter import WenFilter  # noqa: F401
