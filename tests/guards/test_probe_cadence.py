"""``guard.every_n_steps: auto``: the probe cadence from the probe share and the batch size."""

import pytest

from memreg.config_schema import ConfigError
from memreg.guards.anisotropy_gate.config import PROBE_SHARE, AnisotropyGateConfig, resolve_every_n
from memreg.guards.anisotropy_gate.probes import probe_samples_of


@pytest.mark.parametrize("batch, share, expected", [
    (32, PROBE_SHARE, 2),    # 4 probe samples / (32 / 16) = 2
    (2, PROBE_SHARE, 32),    # 4 / (2 / 16)
    (1, PROBE_SHARE, 64),
    (3, PROBE_SHARE, 22),    # ceil(4 / 0.1875) = ceil(21.33)
    (64, PROBE_SHARE, 1),    # 4 / 4 = 1
    (256, PROBE_SHARE, 1),   # never below every step
    (4, 0.5, 2),
])
def test_auto_cadence_keeps_the_probe_share(batch, share, expected):
    assert resolve_every_n("auto", 4, batch, share) == expected


def test_an_integer_cadence_is_used_as_given_and_the_combined_signal_doubles_the_samples():
    assert resolve_every_n(5, 4, 2) == 5
    assert probe_samples_of(2, "norm") == 4 and probe_samples_of(2, "align") == 4
    assert probe_samples_of(2, "combined") == 8
    assert resolve_every_n("auto", probe_samples_of(2, "combined"), 32) == 4


@pytest.mark.parametrize("kw, named", [
    (dict(every_n_steps="often"), "guard.every_n_steps"),
    (dict(every_n_steps=0), "guard.every_n_steps"),
    (dict(probe_share=0.0), "guard.probe_share"),
    (dict(probe_share=1.5), "guard.probe_share"),
])
def test_bad_cadence_settings_are_named(kw, named):
    with pytest.raises(ConfigError, match=named):
        AnisotropyGateConfig(**kw)
