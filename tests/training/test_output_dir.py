"""memreg.training.output_dir: the output-dir lock and moving a previous run aside."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from memreg.training import output_dir as od

from .conftest import run


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(d, pid: int, host: str | None = None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / od.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                              "started": "2026-01-01T00:00:00Z"}))


def test_lock_records_pid_and_host_and_is_released(tmp_path):
    lock = od.OutputDirLock.acquire(tmp_path / "run")
    held = json.loads((tmp_path / "run" / od.LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(od.OutputDirLockedError, match=f"in use by PID {os.getpid()} on this machine"):
        od.OutputDirLock.acquire(tmp_path / "run")
    lock.release()
    assert not (tmp_path / "run" / od.LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = _dead_pid()
    _write_lock(tmp_path, pid)
    with caplog.at_level("WARNING"):
        lock = od.OutputDirLock.acquire(tmp_path)
    assert f"held by PID {pid}" in caplog.text and "no longer running" in caplog.text
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    _write_lock(tmp_path, _dead_pid(), host="some-other-node")
    with pytest.raises(od.OutputDirLockedError, match="host 'some-other-node'.*delete the lock only"):
        od.OutputDirLock.acquire(tmp_path)


def test_release_leaves_someone_elses_lock(tmp_path):
    lock = od.OutputDirLock.acquire(tmp_path)
    _write_lock(tmp_path, 1)                                 # replaced behind our back (pid 1 is alive)
    lock.release()
    assert (tmp_path / od.LOCK_NAME).exists()


def test_move_aside_keeps_everything_and_never_overwrites_an_earlier_copy(tmp_path, caplog):
    run_dir = tmp_path / "out"
    (run_dir / "checkpoint-3").mkdir(parents=True)
    (run_dir / "checkpoint-3" / "w.bin").write_bytes(b"old")
    with caplog.at_level("WARNING"):
        first = od.move_aside(run_dir)
    assert first.name.startswith("out.prev-") and (first / "checkpoint-3" / "w.bin").read_bytes() == b"old"
    assert not run_dir.exists() and f"to {first}" in caplog.text
    (run_dir / "x").mkdir(parents=True)
    second = od.move_aside(run_dir)
    assert second != first and first.is_dir() and (second / "x").is_dir()
    (tmp_path / "only_lock").mkdir()
    _write_lock(tmp_path / "only_lock", 1)
    assert od.move_aside(tmp_path / "only_lock") is None   # nothing to keep


def test_training_into_a_dir_a_live_process_holds_is_refused(tiny_sd_eps, tiny_data, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(out, holder.pid)
        with pytest.raises(od.OutputDirLockedError, match=f"PID {holder.pid}"):
            run(tiny_sd_eps, tiny_data, out, steps=1, resume_from_checkpoint="latest")
        with pytest.raises(od.OutputDirLockedError, match=f"PID {holder.pid}"):
            run(tiny_sd_eps, tiny_data, out, steps=1, overwrite_output_dir="true")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]   # not moved aside under the holder
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): its lock is stale, the next run takes it over and releases it at the end
    res = run(tiny_sd_eps, tiny_data, out, steps=1, resume_from_checkpoint="latest")
    assert res.global_step == 1 and not (out / od.LOCK_NAME).exists()
