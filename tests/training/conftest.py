"""Fixtures for the training tests: a tiny imagefolder and shared tiny training runs.

Runs are in-process ``train(load_config(argv))`` calls on ``configs/tiny_cpu.yaml`` with a few
steps; the session-scoped ones are shared by several tests (keep the suite well under 4 minutes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"

CAPTIONS = [
    "a red circle", ["a blue square", "a blue box"], "a green triangle", "a yellow star",
    "a white ring", ["a black cross", "a dark cross"], "a pink dot", "a brown tree",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: multi-process (accelerate launch --cpu) run, < 60 s")


def make_imagefolder(root: Path, n: int = 8, corrupt: int = 0, size: int = 32, list_captions: bool = True,
                     caption_key: str = "text") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"img_{i}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(root / name)
        cap = CAPTIONS[i % len(CAPTIONS)]
        if list_captions:
            cap = cap if isinstance(cap, list) else [cap]
        elif isinstance(cap, list):
            cap = cap[0]
        lines.append({"file_name": name, caption_key: cap})
    for j in range(corrupt):
        name = f"bad_{j}.png"
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        lines.append({"file_name": name, caption_key: ["a broken file"] if list_captions else "a broken file"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("tiny_data"))


def base_argv(model: Path, data: Path, out: Path, steps: int = 4, **extra) -> list[str]:
    argv = ["--config", str(TINY_CONFIG), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(out), "--max_train_steps", str(steps),
            "--report_to", "none"]
    for k, v in extra.items():
        argv += [f"--{k.replace('__', '.')}", str(v)]
    return argv


def run(model: Path, data: Path, out: Path, steps: int = 4, **extra):
    from memreg.training.config import load_config
    from memreg.training.loop import train

    return train(load_config(base_argv(model, data, out, steps, **extra)))


def lora_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "pytorch_lora_weights.safetensors"))


# the absolute penalty (reference none, no gate): its gradient on every step; the defaults are in tests/guards/test_gate.py
PENALTY_ON = dict(guard__type="penalty", guard__reference="none", guard__gate=False, guard__every_n_steps=1,
                  guard__penalty="score", guard__weight=1.0, guard__tau=0.0,
                  guard__zscore="none", guard__tau_ema=0.5, guard__calibration_prompts=4,
                  guard__calibration_seeds=1)


@pytest.fixture(scope="session")
def plain_run(tiny_sd_eps, tiny_data, tmp_path_factory):
    """4 LoRA steps, no guard, checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("runs") / "plain"
    res = run(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=2)
    return out, res


@pytest.fixture(scope="session")
def penalty_run(tiny_sd_eps, tiny_data, tmp_path_factory):
    """4 LoRA steps with an always-active penalty (tau 0, running tau), checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("runs") / "penalty"
    res = run(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=2, report_to="tensorboard", **PENALTY_ON)
    return out, res


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Tests that build an Accelerator must not leak its process state into the next one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
