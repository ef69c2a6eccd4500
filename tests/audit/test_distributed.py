"""``accelerate launch -m memreg.cli audit``: 1 and 2 CPU processes (gloo) give identical results.

As in tests/training/test_distributed.py, two processes on a machine without GPUs are launched with
``--multi_gpu`` (torchrun); the audit then runs its processes on CPU with gloo.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def launch(n: int, data: Path, model: Path, out: Path, port: int) -> str:
    from memreg.testing import accelerate_launch

    return accelerate_launch(n, ["-m", "memreg.cli", "audit", "--data", str(data), "--model", str(model),
                                 "--out", str(out), "--caption-column", "caption", "--shard-size", "3",
                                 "--calibration-images", "4"], port, REPO)


def shard_rows(out: Path) -> list[str]:
    lines = []
    for p in sorted((out / "parts").glob("shard-*.jsonl")):
        lines += p.read_text().splitlines()[1:]  # the header holds timings and the process
    return lines


@pytest.mark.distributed
def test_one_and_two_processes_agree(audit_folder, tiny_sd_eps, tmp_path):
    log1 = launch(1, audit_folder, tiny_sd_eps, tmp_path / "p1", 29541)
    log2 = launch(2, audit_folder, tiny_sd_eps, tmp_path / "p2", 29542)
    assert "process 0/1: 5 shard(s) audited" in log1
    assert "process 0/2: 3 shard(s) audited" in log2 and "process 1/2: 2 shard(s) audited" in log2
    ranks = {json.loads(p.read_text().splitlines()[0])["rank"] for p in (tmp_path / "p2" / "parts").glob("shard-*")}
    assert ranks == {0, 1}
    assert shard_rows(tmp_path / "p1") == shard_rows(tmp_path / "p2")
    for f in ("clusters.jsonl", "captions.jsonl", "unreadable.jsonl"):
        assert (tmp_path / "p1" / f).read_text() == (tmp_path / "p2" / f).read_text(), f
    a1, a2 = (json.loads((tmp_path / p / "audit.json").read_text()) for p in ("p1", "p2"))
    for key in ("counts", "calibration", "top_clusters", "unreadable"):
        assert a1[key] == a2[key], key
    assert a2["timing"]["processes"] == 2
