"""``accelerate launch -m memreg.cli attack``: 1 and 2 CPU processes (gloo) attack alike.

The records (every attack's similarities, steps, generations, the best reproduction's seed) do not
depend on the process count: seeds come from the target's number, the cut into shards from
``--shard-size``. Only the seconds differ. A random tiny pipeline suffices (nothing is extracted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import photo, write_folder

REPO = Path(__file__).resolve().parents[2]


def launch(n: int, model: Path, data: Path, control: Path, out: Path, port: int) -> str:
    from memreg.testing import accelerate_launch

    return accelerate_launch(n, ["-m", "memreg.cli", "attack", "--model", str(model), "--data", str(data),
                                 "--control", str(control), "--out", str(out), "--shard-size", "1", "--draws", "1",
                                 "--steps", "2", "--perturbed", "1", "--num-inference-steps", "2", "--no-progress"],
                             port, REPO)


def _records(out: Path) -> list[dict]:
    recs = json.loads((out / "attack.json").read_text())["targets"]
    for r in recs:
        for a in r["attacks"].values():
            a.pop("seconds")
    return recs


@pytest.mark.distributed
def test_one_and_two_processes_agree(tiny_sd_eps, tmp_path):
    data = write_folder(tmp_path / "train", [("a.png", photo("coffee", 32), "a cup"),
                                             ("b.png", photo("coffee", 32), "a cup"),
                                             ("c.png", photo("moon", 32), "the moon")])
    control = write_folder(tmp_path / "control", [("x.png", photo("coins", 32), "coins"),
                                                  ("y.png", photo("camera", 32), "a camera")])
    launch(1, tiny_sd_eps, data, control, tmp_path / "p1", 29561)
    launch(2, tiny_sd_eps, data, control, tmp_path / "p2", 29562)
    ranks = {json.loads(p.read_text().splitlines()[0])["rank"] for p in (tmp_path / "p2" / "parts").glob("shard-*")}
    assert ranks == {0, 1}
    r1, r2 = _records(tmp_path / "p1"), _records(tmp_path / "p2")
    assert len(r1) == 4 and r1 == r2
