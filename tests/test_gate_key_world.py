"""scripts/gate_key_world.py: the many-wordings copy of the demo data (the runs are the demo's own code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memreg.testing import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gate_key_world.py"


def test_duplicated_rows_get_every_wording_and_others_keep_theirs(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    para = {"drop": "a circle", "reorder": "a cross and a circle", "synonym": "a disc and a cross"}
    (data / "manifest.json").write_text(json.dumps({"memorized": [{"caption": "a circle and a cross",
                                                                   "paraphrases": para}]}))
    rows = [{"file_name": "p0.png", "caption": "a circle and a cross", "group": "duplicated"},
            {"file_name": "s0.png", "caption": "a red box", "group": "unique"}]
    (data / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    world = load_script(SCRIPT)
    out = world.many_wordings_copy(data, tmp_path / "copy")
    got = [json.loads(x) for x in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert got[0]["captions"] == ["a circle and a cross", "a circle", "a cross and a circle", "a disc and a cross"]
    assert got[1]["captions"] == ["a red box"] and got[0]["caption"] == "a circle and a cross"
    assert json.loads((data / "train" / "metadata.jsonl").read_text().splitlines()[0]) == rows[0]   # source untouched
    with pytest.raises(SystemExit, match="exists"):
        world.many_wordings_copy(data, tmp_path / "copy")
