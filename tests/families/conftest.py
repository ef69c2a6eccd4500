"""Fixtures for the model-family tests: the tiny SDXL pipeline (built once per session) and helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline dir (two CLIP encoders, text_time UNet, 32 px images)."""
    from memreg.testing import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=3)


@pytest.fixture(scope="session")
def sdxl_components(tiny_sdxl):
    from memreg.models import load_components

    return load_components(str(tiny_sdxl))


@pytest.fixture(scope="session")
def sdxl_data(tmp_path_factory) -> Path:
    """8 images of 40 x 48 (w x h) pixels, so the 32 px training crop has a size and a corner to condition on."""
    root = tmp_path_factory.mktemp("sdxl_data")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        name = f"img_{i}.png"
        Image.fromarray((rng.random((48, 40, 3)) * 255).astype("uint8")).save(root / name)
        lines.append({"file_name": name, "text": CAPTIONS[i % len(CAPTIONS)]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def train_run(model: Path, data: Path, out: Path, steps: int = 2, **extra):
    """``train(load_config(argv))`` on configs/tiny_cpu.yaml, nested keys as ``guard__weight``."""
    from memreg.training.config import load_config
    from memreg.training.loop import train

    argv = ["--config", str(TINY_CONFIG), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--output_dir", str(out), "--max_train_steps", str(steps), "--report_to", "none"]
    for k, v in extra.items():
        argv += [f"--{k.replace('__', '.')}", str(v)]
    return train(load_config(argv))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
