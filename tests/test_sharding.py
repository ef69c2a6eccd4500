"""memreg.sharding: the shard cut, the split over processes, atomic parts, resume, settings check."""

from __future__ import annotations

import json

import pytest

from memreg import sharding


def test_cut_does_not_depend_on_processes():
    assert sharding.shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert sharding.my_shards(5, 0, 2) == [0, 2, 4] and sharding.my_shards(5, 1, 2) == [1, 3]
    assert sharding.my_shards(5, 0, 1) == [0, 1, 2, 3, 4]


def _square(calls):
    def make_work():
        calls.append("made")

        def work(start, stop):
            return {"n": stop - start}, [{"i": i, "sq": i * i} for i in range(start, stop)]
        return work
    return make_work


def test_two_ranks_write_every_part_once_and_a_rerun_skips_them(tmp_path):
    calls = []
    a = sharding.run_shards(tmp_path, 10, 4, 0, 2, _square(calls))
    b = sharding.run_shards(tmp_path, 10, 4, 1, 2, _square(calls))
    assert (a, b) == ({"done": [0, 2], "skipped": []}, {"done": [1], "skipped": []})
    items = [x for k in range(3) for x in sharding.read_part(tmp_path, k)[1]]
    assert items == [{"i": i, "sq": i * i} for i in range(10)]
    head = sharding.read_header(tmp_path, 2)
    assert (head["shard"], head["start"], head["stop"], head["n"], head["rank"]) == (2, 8, 10, 2, 0)
    sharding.part_path(tmp_path, 1).unlink()
    calls.clear()
    assert sharding.run_shards(tmp_path, 10, 4, 0, 1, _square(calls)) == {"done": [1], "skipped": [0, 2]}
    assert sharding.run_shards(tmp_path, 10, 4, 0, 1, _square(calls)) == {"done": [], "skipped": [0, 1, 2]}
    assert calls == ["made"]  # no work left: make_work (e.g. loading a model) is not called
    assert not list(tmp_path.glob(".*.tmp"))


def test_plan_out_keeps_outputs_and_parts_of_other_settings(tmp_path):
    out = tmp_path / "out"
    plan = lambda fp, overwrite=False: sharding.plan_out(out, fp, overwrite, ("r.json",), "a test run")  # noqa: E731
    assert plan({"a": 1}) == "fresh"
    parts = sharding.apply_plan(out, {"a": 1}, "fresh")
    assert json.loads((parts / sharding.FINGERPRINT_FILE).read_text()) == {"a": 1}
    assert plan({"a": 1}) == "resume"
    with pytest.raises(sharding.OutDirError, match="shards of a test run with other settings"):
        plan({"a": 2})
    assert plan({"a": 2}, overwrite=True) == "clear"
    (out / "r.json").write_text("{}")
    with pytest.raises(sharding.OutDirError, match="already has r.json"):
        plan({"a": 1})
