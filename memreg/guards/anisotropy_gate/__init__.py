"""The anisotropy gate (``guard.type: anisotropy_gate``, alias ``penalty``), split by job:

* :mod:`.config` - :class:`AnisotropyGateConfig`, the top-level ``guard.*`` keys and every rule on them;
* :mod:`.probes` - which captions are probed, on which noise, as which UNet inputs;
* :mod:`.threshold` - the verdict (absolute tau, :class:`Calibrator`) behind one interface;
* :mod:`.reference` - the per-caption reference modes (base cache, population threshold);
* :mod:`.gate` - the caption gate; :mod:`.loss` - the penalty; :mod:`.counters` - selectivity logs;
* :mod:`.guard` - :class:`AnisotropyGateGuard`, the wiring.
"""

from memreg.guards.anisotropy_gate.config import AnisotropyGateConfig
from memreg.guards.anisotropy_gate.guard import AnisotropyGateGuard
from memreg.guards.anisotropy_gate.threshold import Calibrator

__all__ = ["AnisotropyGateConfig", "AnisotropyGateGuard", "Calibrator"]
