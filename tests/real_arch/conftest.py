"""Fixtures of the real-architecture tests: pipelines that ``memreg.arch`` builds at the published
SD 1.5 / SD 2.1 / SDXL base configs (random weights, latent 8 = 64 px images).

A built pipeline is cached on disk across sessions under ``$MEMREG_ARCH_CACHE`` (default
``<tmp>/memreg-real-arch``) as ``<family>-<key>``; the key hashes the family's config files, the build
settings, the builder's version and the torch/diffusers/transformers versions, so any change rebuilds.
A build runs ``scripts/make_real_arch.py`` in a subprocess (its peak memory never adds to the test
process's) into a temporary sibling that is renamed into place only when complete; building a new
key removes the family's older entries (disk: SD 1.5 4.3 GB, SD 2.1 5.2 GB, SDXL 14 GB, SDXL
``blocks=1`` 6.2 GB).

The tests at a real architecture (test_sd.py, test_sdxl.py) are marked ``slow`` and run by default
(``make test``); ``-m "not slow"`` skips them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MAKE = REPO / "scripts" / "make_real_arch.py"
SAMPLE_SIZE = 8          # latent 8x8: 64 px images
RESOLUTION = 64
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def cache_root() -> Path:
    return Path(os.environ.get("MEMREG_ARCH_CACHE") or Path(tempfile.gettempdir()) / "memreg-real-arch")


def cache_key(family: str, blocks: int | None, seed: int = 0) -> str:
    import diffusers
    import torch
    import transformers

    from memreg.arch.build import BUILD_VERSION, config_digest

    raw = json.dumps([family, config_digest(family), SAMPLE_SIZE, blocks, seed, BUILD_VERSION, torch.__version__,
                      diffusers.__version__, transformers.__version__])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cached_pipeline(family: str, blocks: int | None = None, seed: int = 0) -> Path:
    """The cached pipeline dir of ``family`` (built now if absent); its build log is ``build.log`` in it."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tag = family if blocks is None else f"{family}_b{blocks}"
    final = root / f"{tag}-{cache_key(family, blocks, seed)}"
    with open(root / f".lock-{tag}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "memreg_arch.json").is_file():
            return final
        for old in root.glob(f"{tag}-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = root / f".building-{tag}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, str(MAKE), family, str(tmp), "--sample-size", str(SAMPLE_SIZE), "--seed", str(seed)]
        if blocks is not None:
            cmd += ["--blocks", str(blocks)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"building {family} failed ({proc.returncode}): {proc.stderr[-3000:]}")
        (tmp / "build.log").write_text(proc.stdout)
        os.rename(tmp, final)
    return final


def build_line(pipeline_dir: Path) -> str:
    """The build's one-line summary (time, peak memory, size, parameters), as the script printed it."""
    log = Path(pipeline_dir) / "build.log"
    return log.read_text().strip().splitlines()[-1] if log.is_file() else ""


def make_imagefolder(root: Path, n: int = 4, size: int = RESOLUTION) -> Path:
    """``n`` random RGB images with one caption each (metadata.jsonl, key ``text``)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(root / f"img_{i}.png")
            f.write(json.dumps({"file_name": f"img_{i}.png", "text": CAPTIONS[i % len(CAPTIONS)]}) + "\n")
    return root


@pytest.fixture(scope="session")
def arch_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("arch_data"))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """A run that built an Accelerator must not leak its process state into the next one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
