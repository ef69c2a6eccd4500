"""Fault injection: every way a run can break ends in its exact, named outcome, through train/train.py.

Each case runs the real entry point in a subprocess (exit code and stderr as a user sees them); faults
are injected by a few lines run before ``main`` (a writer that reports a full disk, a kill -9 at a
chosen point) or by damaging files between runs.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memreg.training import checkpoint as ckpt
from .conftest import REPO, base_argv, lora_weights, make_imagefolder

TRAIN = REPO / "train" / "train.py"
ENV = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")


def _train(tmp_path: Path, argv: list[str], inject: str = "", wait: bool = True):
    """train/train.py ``argv`` in a subprocess, ``inject`` (Python) run first; the finished process, or
    with ``wait=False`` the running one."""
    script = tmp_path / f"run_{random.random():.12f}.py"
    script.write_text("import os, signal, sys, runpy\n" f"sys.path.insert(0, {str(REPO)!r})\n" + inject
                      + f"\nsys.argv = [{str(TRAIN)!r}] + sys.argv[1:]\nrunpy.run_path({str(TRAIN)!r}, run_name='__main__')\n")
    cmd = [sys.executable, str(script), *argv]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=ENV)


def _error_line(proc) -> str:
    """The one error line a failed run prints last; no traceback anywhere."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def _has_final(out: Path) -> bool:
    return (out / ckpt.FINAL_MARKER).is_file()


@pytest.fixture(scope="module")
def reference(tiny_sd_eps, tiny_data, tmp_path_factory):
    """An uninterrupted 4-step run with a checkpoint every step: what every resumed run must equal."""
    tmp = tmp_path_factory.mktemp("faults")
    out = tmp / "straight"
    proc = _train(tmp, base_argv(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _has_final(out)
    return out


def _assert_same_lora(a: Path, b: Path) -> None:
    wa, wb = lora_weights(a), lora_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------------ non-finite training

def test_a_diverging_learning_rate_stops_at_the_step_and_writes_no_final_weights(tiny_sd_eps, tiny_data, tmp_path):
    out = tmp_path / "diverged"
    proc = _train(tmp_path, base_argv(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=1,
                                      learning_rate="1e8"))
    line = _error_line(proc)
    # step 1 moves every LoRA weight by ~lr = 1e8; step 2's loss is then NaN (seeded, so always step 2)
    assert line.startswith("error: NonFiniteError: step 2: 1 non-finite loss value(s)")
    assert "the last good checkpoint is checkpoint-1" in line and "learning_rate=1e+08 is likely too high" in line
    assert [d.name for d in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert ckpt.completeness_problem(out / "checkpoint-1", content=True) is None
    assert not _has_final(out) and not (out / ckpt.LORA_WEIGHT_NAME).exists()
    assert ckpt.has_final_outputs(out) is None


@pytest.mark.parametrize("flag,value,message", [
    ("learning_rate", "inf", "learning_rate: expected a finite number, got 'inf'"),
    ("learning_rate", "nan", "learning_rate: expected a finite number, got 'nan'"),
    ("learning_rate", "-1", "learning_rate=-1.0 must be > 0"),
    ("max_grad_norm", "nan", "max_grad_norm: expected a finite number, got 'nan'"),
    ("adam_beta2", "1", "adam_beta2=1.0 must be in [0, 1)"),
])
def test_non_finite_or_out_of_range_settings_are_refused_before_any_weights_load(tiny_sd_eps, tiny_data, tmp_path,
                                                                                 flag, value, message):
    from memreg.training.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(base_argv(tiny_sd_eps, tiny_data, tmp_path / "o", **{flag: value}))
    assert str(err.value) == message


# ------------------------------------------------------------------ damaged checkpoints

@pytest.fixture(scope="module")
def stopped(tiny_sd_eps, tiny_data, tmp_path_factory):
    """A run stopped after step 2 (checkpoints 1 and 2), to be damaged by copies in each test."""
    tmp = tmp_path_factory.mktemp("stopped")
    out = tmp / "run"
    proc = _train(tmp, base_argv(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=1, stop_at_step=2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _copy_run(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".memreg.lock"))
    return dest


def test_a_state_file_changed_at_the_same_size_is_caught_by_its_hash(stopped, reference, tiny_sd_eps, tiny_data,
                                                                     tmp_path):
    out = _copy_run(stopped, tmp_path / "run")
    rng_file = out / "checkpoint-2" / "random_states_0.pkl"
    data = bytearray(rng_file.read_bytes())
    data[len(data) // 2] ^= 0xFF                                   # same size, different content
    rng_file.write_bytes(bytes(data))
    argv = base_argv(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=1)
    line = _error_line(_train(tmp_path, argv + ["--resume_from_checkpoint", "checkpoint-2"]))
    assert "checkpoint-2" in line and "random_states_0.pkl has changed since it was saved" in line
    # latest skips it with a warning naming the file and resumes from checkpoint-1: the run ends exact
    proc = _train(tmp_path, argv + ["--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint-2 (random_states_0.pkl has changed since it was saved" in proc.stderr
    assert "resuming from checkpoint-1" in proc.stderr
    _assert_same_lora(reference, out)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_hostile_pickle_is_refused_by_name_and_never_run(stopped, tiny_sd_eps, tiny_data, tmp_path):
    out = _copy_run(stopped, tmp_path / "run")
    target = out / "checkpoint-2" / "optimizer.bin"
    target.write_bytes(pickle.dumps(_Payload()))
    (out / "checkpoint-2" / ckpt.COMPLETE_MARKER).unlink()
    ckpt._write_marker(out / "checkpoint-2", 2, 1)                 # the marker agrees: only loading can tell
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(TRAIN), *base_argv(tiny_sd_eps, tiny_data, out, steps=4,
                           checkpointing_steps=1), "--resume_from_checkpoint", "checkpoint-2"],
                          capture_output=True, text=True, timeout=300, check=False, env=ENV, cwd=cwd)
    line = _error_line(proc)
    assert line == (f"error: CheckpointError: refusing to load {target}: it contains Python objects; "
                    "memreg loads tensors only")
    assert not (cwd / "pwned").exists()


def test_garbage_rng_state_with_an_agreeing_marker_is_an_error(stopped, tiny_sd_eps, tiny_data, tmp_path):
    out = _copy_run(stopped, tmp_path / "run")
    d = out / "checkpoint-2"
    torch.save({"random_state": "not a state"}, d / "random_states_0.pkl")
    (d / ckpt.COMPLETE_MARKER).unlink()
    ckpt._write_marker(d, 2, 1)
    line = _error_line(_train(tmp_path, base_argv(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=1)
                              + ["--resume_from_checkpoint", "checkpoint-2"]))
    assert f"checkpoint file {d / 'random_states_0.pkl'} holds no usable random state" in line


# ------------------------------------------------------------------ a full disk

ENOSPC_WRITER = """
import errno
from memreg.training import checkpoint as ckpt
real_save_lora = ckpt.save_lora
def save_lora(output_dir, *a, **k):
    if {where!r} in str(output_dir):
        raise OSError(errno.ENOSPC, "No space left on device", str(output_dir) + "/pytorch_lora_weights.safetensors")
    return real_save_lora(output_dir, *a, **k)
ckpt.save_lora = save_lora
"""


@pytest.mark.parametrize("where,expect_intact", [("checkpoint-2.tmp", "checkpoint-1"), ("final.tmp", "checkpoint-4")])
def test_a_full_disk_is_one_line_naming_the_path_and_the_intact_checkpoints(tiny_sd_eps, tiny_data, tmp_path,
                                                                             where, expect_intact):
    out = tmp_path / "full"
    proc = _train(tmp_path, base_argv(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=1),
                  inject=ENOSPC_WRITER.format(where=where))
    line = _error_line(proc)
    assert line.startswith("error: DiskFullError: no space left on device while writing ")
    assert where in line and line.endswith(f"; checkpoints up to {expect_intact} are intact")
    assert ckpt.list_checkpoints(out)[-1].name == expect_intact
    assert ckpt.completeness_problem(out / expect_intact, content=True) is None
    assert not ckpt.unfinished_saves(out) and not ckpt.unfinished_finals(out)     # the partial save is gone
    assert not _has_final(out)


# ------------------------------------------------------------------ kill -9

KILL_AT = """
from memreg.training import checkpoint as ckpt
real = ckpt.{name}
calls = []
def {name}(*a, **k):
    calls.append(1)
    if len(calls) == {nth}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
ckpt.{name} = {name}
"""


def _resume_until_done(tmp_path, argv) -> None:
    proc = _train(tmp_path, argv + ["--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("name,nth", [
    ("_write_marker", 3),        # mid-checkpoint: step 3's state written, its marker not
    ("_move_into_place", 2),     # step 2's save complete in its .tmp dir, not yet renamed
    ("_replace_entry", 2),       # mid-final-save: the LoRA moved into place, its kohya copy not
])
def test_kill_9_at_a_chosen_point_resumes_to_the_uninterrupted_weights(reference, tiny_sd_eps, tiny_data, tmp_path,
                                                                       name, nth):
    out = tmp_path / "killed"
    argv = base_argv(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=1)
    proc = _train(tmp_path, argv, inject=KILL_AT.format(name=name, nth=nth))
    assert proc.returncode == -signal.SIGKILL
    assert not _has_final(out) and ckpt.has_final_outputs(out) is None     # latest knows it did not finish
    _resume_until_done(tmp_path, argv)
    assert _has_final(out) and not ckpt.unfinished_finals(out)
    _assert_same_lora(reference, out)
    marker = json.loads((out / ckpt.FINAL_MARKER).read_text())
    assert {ckpt.LORA_WEIGHT_NAME, ckpt.KOHYA_WEIGHT_NAME, "config.yaml"} <= set(marker["files"])


def test_kill_9_at_random_instants_resumes_to_the_uninterrupted_weights(reference, tiny_sd_eps, tiny_data,
                                                                        tmp_path):
    """Three kills at seeded random instants of the run's wall time (loading, training, saving alike)."""
    out = tmp_path / "random_kills"
    argv = base_argv(tiny_sd_eps, tiny_data, out, steps=4, checkpointing_steps=1)
    t0 = time.perf_counter()
    _train(tmp_path, base_argv(tiny_sd_eps, tiny_data, tmp_path / "timing", steps=4, checkpointing_steps=1))
    span = time.perf_counter() - t0
    rng = random.Random(1234)
    for _ in range(3):
        extra = ["--resume_from_checkpoint", "latest"] if out.exists() else []
        proc = _train(tmp_path, argv + extra, wait=False)
        time.sleep(rng.uniform(0.3, 1.0) * span)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if _has_final(out):
            break
    if not _has_final(out):
        _resume_until_done(tmp_path, argv)
    _assert_same_lora(reference, out)


# ------------------------------------------------------------------ hostile and odd data

def test_paths_that_leave_the_data_folder_are_refused_with_their_line(tiny_sd_eps, tmp_path):
    root = make_imagefolder(tmp_path / "d", n=3)
    meta = root / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    lines[1] = json.dumps({"file_name": "../../etc/passwd", "text": ["x"]})
    meta.write_text("\n".join(lines) + "\n")
    line = _error_line(_train(tmp_path, base_argv(tiny_sd_eps, root, tmp_path / "o", steps=1)))
    assert line == (f"error: DataError: {meta}:2: file_name '../../etc/passwd' leaves the data folder "
                    f"{str(root)!r}; pass --allow_external_files true to read it")


def test_a_symlink_to_a_file_outside_is_refused_unless_allowed(tmp_path):
    from memreg.training.data import DataError, check_data_source

    root = make_imagefolder(tmp_path / "d", n=2)
    outside = tmp_path / "private.png"
    (root / "img_1.png").rename(outside)
    (root / "img_1.png").symlink_to(outside)
    with pytest.raises(DataError, match=r"metadata.jsonl:2: file_name 'img_1.png' is a symbolic link to .*private"
                                        r"\.png', outside the data folder"):
        check_data_source(str(root), None)
    check_data_source(str(root), None, allow_external_files=True)
    (root / "img_1.png").unlink()
    (root / "img_1.png").symlink_to(root / "img_0.png")           # a link that stays inside is fine
    check_data_source(str(root), None)


def test_a_model_with_only_pickled_weights_is_named_before_loading(tiny_sd_eps, tiny_data, tmp_path):
    import shutil

    model = tmp_path / "bin_model"
    shutil.copytree(tiny_sd_eps, model)
    for f in (model / "unet").glob("*.safetensors"):
        f.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    line = _error_line(_train(tmp_path, base_argv(model, tiny_data, tmp_path / "o", steps=1)))
    assert line.startswith(f"error: ModelError: model dir {str(model)!r}: unet/ holds only pickled weights "
                           "(diffusion_pytorch_model.bin); memreg loads safetensors only")


def test_16_bit_training_images_reach_the_model_as_their_grey_level(tmp_path):
    """A 16-bit grey PNG at level 32768 is 8-bit 128 (not the white convert('RGB') made of it)."""
    import numpy as np
    from PIL import Image

    from memreg.training import data as D
    from memreg.training.config import TrainConfig

    root = tmp_path / "d16"
    root.mkdir()
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(root / "grey.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "grey.png", "text": "grey"}) + "\n")
    cfg = TrainConfig(train_data_dir=str(root), pretrained_model_name_or_path="x")
    data = D.build_train_data(cfg, seed=0)
    item = D.TrainDataset(data, 16, center_crop=True, random_flip=False, seed=0)[(0, 0)]
    # 128 / 255 * 2 - 1
    assert torch.allclose(item["pixel_values"], torch.full((3, 16, 16), 128 / 255 * 2 - 1), atol=1e-6)
