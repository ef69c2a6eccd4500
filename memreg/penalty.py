"""Moved to :mod:`memreg.guards.penalty` (the penalty guard); this name keeps old imports working."""

from memreg.guards.penalty import (MODES, TERMS, ZSCORES, Calibration, MemorizationPenalty,  # noqa: F401
                                   PenaltyOutput, ProbeBatch, make_scorer)
