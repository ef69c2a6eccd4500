"""Two-process CPU run (gloo DDP) through ``accelerate launch``: 4 steps, tiny pipeline, penalty on.

accelerate 1.15's ``launch --cpu --num_processes 2`` starts ONE process unless an MPI hostfile is
given, so the test launches with ``--multi_gpu`` (torchrun); on a machine without GPUs the trainer
then runs DDP on CPU with gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import REPO, base_argv, lora_weights


def _launch_two(port: int, argv: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 train/train.py ARGV`` on CPU (gloo)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(REPO / "train" / "train.py"), *argv]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.distributed
def test_two_process_cpu_run_with_penalty(tiny_sd_eps, tiny_data, tmp_path):
    out = tmp_path / "ddp"
    t0 = time.time()
    proc = _launch_two(29517, base_argv(tiny_sd_eps, tiny_data, out, steps=4, train_batch_size=2, checkpointing_steps=2,
                                        guard__type="penalty", guard__penalty="score", guard__weight=0.1,
                                        guard__every_n_steps=2,
                                        guard__population_min=1, guard__calibration_prompts=4,
                                        guard__calibration_seeds=1))
    elapsed = time.time() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "training: 4 steps" in log and "x 2 processes" in log
    assert "in the denoising UNet forward" in log  # one fused forward per backward under DDP
    assert elapsed < 60, f"2-process run took {elapsed:.0f} s"
    assert lora_weights(out)
    # each process saved its own guard state (its own probe generator) in the checkpoint
    assert (out / "checkpoint-2" / "guard_state_0.json").is_file()
    assert (out / "checkpoint-2" / "guard_state_1.json").is_file()
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()
    # the gate's flags and the population gathered from both processes' probes are the same everywhere
    from safetensors.torch import load_file

    states = [load_file(str(out / "checkpoint-4" / f"guard_state_{r}.safetensors")) for r in (0, 1)]
    shared = [k for k in states[0] if ".gate." in k or ".population." in k]
    assert {"penalty.gate.flagged", "penalty.reference.population.keys"} <= set(shared)
    assert states[0]["penalty.reference.population.buffer"].numel() >= 2
    for k in shared:
        assert torch.equal(states[0][k], states[1][k]), k
    print(f"2-process run took {elapsed:.1f} s")


@pytest.mark.distributed
def test_two_process_agc_keeps_the_same_averages_on_every_process(tiny_sd_eps, tiny_data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ddp_agc"
    proc = _launch_two(29518, base_argv(tiny_sd_eps, tiny_data, out, steps=2, train_batch_size=2,
                                        checkpointing_steps=2, guard__type="agc"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    states = [load_file(str(out / "checkpoint-2" / f"guard_state_{r}.safetensors")) for r in (0, 1)]
    assert states[0].keys() == states[1].keys() and states[0]
    for k in states[0]:
        # 2 steps x 2 processes x 2 samples: every process applied all 8 (gathered) losses
        assert torch.equal(states[0][k], states[1][k]), k
        assert 1 <= int((states[0][k] > 0).sum()) <= 8


NAN_ON_RANK_1 = """
import os, runpy, sys
sys.path.insert(0, {repo!r})
from memreg.training import finite
real, calls = finite.nonfinite_losses, [0]
def nonfinite_losses(losses):
    calls[0] += 1      # one call per optimizer step: rank 1 alone reports a NaN loss at step 3
    return real(losses) + int(os.environ.get("RANK") == "1" and calls[0] == 3)
finite.nonfinite_losses = nonfinite_losses
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.distributed
def test_a_non_finite_step_on_one_process_stops_every_process_at_that_step(tiny_sd_eps, tiny_data, tmp_path):
    """The verdict is summed over processes: rank 0 saw nothing wrong, yet stops at the same step
    instead of waiting forever in the next collective."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1.format(repo=str(REPO), train=str(REPO / "train" / "train.py")))
    out = tmp_path / "ddp_nan"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519", str(script),
           *base_argv(tiny_sd_eps, tiny_data, out, steps=4, train_batch_size=2, checkpointing_steps=2)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-4000:]
    assert log.count("error: NonFiniteError: step 3: 1 non-finite loss value(s)") == 2, log[-4000:]  # both ranks
    assert "the last good checkpoint is checkpoint-2" in log
    assert time.time() - t0 < 120
    from memreg.training import checkpoint as ckpt

    assert [d.name for d in ckpt.list_checkpoints(out)] == ["checkpoint-2"] and ckpt.has_final_outputs(out) is None
