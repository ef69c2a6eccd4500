"""Markers of the guard tests (``distributed``: a 2-process accelerate launch, as in tests/training)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: multi-process (accelerate launch --cpu) run, < 60 s")
