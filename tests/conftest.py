"""Shared fixtures: tiny SD pipelines built once per test session (offline, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


@pytest.fixture(scope="session")
def tiny_sd_eps(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction SD pipeline dir (SD1.x-like)."""
    from memreg.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_eps"), prediction_type="epsilon", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """A tiny v-prediction SD pipeline dir (SD2.x-like)."""
    from memreg.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def eps_components(tiny_sd_eps):
    from memreg.models import load_components

    return load_components(str(tiny_sd_eps))


@pytest.fixture(scope="session")
def v_components(tiny_sd_v):
    from memreg.models import load_components

    return load_components(str(tiny_sd_v))


@pytest.fixture(scope="session")
def shared_prompts() -> Path:
    """``../shared/data/prompts`` beside the checkout (skips if absent)."""
    if not SHARED_PROMPTS.is_dir():
        pytest.skip(f"shared prompt lists not found at {SHARED_PROMPTS}")
    return SHARED_PROMPTS
