"""``memreg audit`` end to end on a small imagefolder with planted copies (answers by hand in conftest)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from memreg.cli import main

from .conftest import folder_rows


def audit(data, out, *extra, model=None, caption="caption"):
    argv = ["audit", "--data", str(data), "--out", str(out), "--caption-column", caption, "--shard-size", "5",
            "--calibration-images", "8", *extra]
    argv += ["--model", str(model)] if model else ["--no-score"]
    return main(argv)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def scored(audit_folder, tiny_sd_eps, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit_out") / "a"
    assert audit(audit_folder, out, model=tiny_sd_eps) == 0
    return out


def test_clusters_captions_and_unreadable(scored):
    clusters = jsonl(scored / "clusters.jsonl")
    rows = [sorted(m["row"] for m in c["members"]) for c in clusters]
    assert sorted(rows) == [[0, 1, 2, 3], [4, 5]]
    by_rows = {tuple(r): c for r, c in zip(rows, clusters)}
    assert by_rows[(0, 1, 2, 3)]["images"] == 2 and by_rows[(4, 5)]["images"] == 2
    assert clusters[0]["rank"] == 1 and clusters[0]["risk"] >= clusters[1]["risk"]
    report = json.loads((scored / "audit.json").read_text())
    assert report["counts"]["unreadable"] == 1
    assert report["unreadable"][0]["row"] == 12 and report["unreadable"][0]["name"].endswith("bad.png")
    assert report["counts"]["distinct_images"] == 10  # 12 readable rows, 2 exact repeats of the astronaut
    caps = {c["normalized"]: c for c in jsonl(scored / "captions.jsonl")}
    assert caps["a photo of a cat"]["count"] == 2 and len(caps["a photo of a cat"]["variants"]) == 2
    assert caps["an astronaut"]["count"] == 3
    assert report["counts"]["captions"]["exact"]["repeated"] == 1       # "an astronaut"
    assert report["counts"]["captions"]["normalized"]["repeated"] == 2  # + the cat captions
    assert all(math.isfinite(c["score"]) for c in caps.values())
    cal = report["calibration"]
    assert cal["images"] == 8 and cal["copies"] == 32 and 0 < cal["recall"] <= 1
    page = (scored / "audit.html").read_text()
    assert page.count("<img src='data:image/png;base64,") >= 4


def test_risk_matches_scores_in_shards(scored):
    """risk = log2(1 + size) * (1 + q), q from the per-row scores the shards recorded."""
    rows = []
    for p in sorted((scored / "parts").glob("shard-*.jsonl")):
        rows += [json.loads(line) for line in p.read_text().splitlines()[1:]]
    scores = [r["score"] for r in rows if r["score"] is not None]
    assert len(scores) == 13  # every row has a caption, the broken file's included
    for c in jsonl(scored / "clusters.jsonl"):
        top = max(rows[m["row"]]["score"] for m in c["members"])
        q = sum(s < top for s in scores) / len(scores)
        assert c["risk"] == pytest.approx(math.log2(1 + c["size"]) * (1 + q), abs=1e-6)


def test_resume_skips_finished_shards_and_refuses_to_overwrite(scored, tmp_path, capsys):
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(scored, out)
    data = json.loads((scored / "audit.json").read_text())
    capsys.readouterr()
    assert audit(data["data"]["path"], out, model=data["model"]) == 2
    assert "already has audit.json" in capsys.readouterr().err
    (out / "parts" / "shard-00001.jsonl").unlink()  # as if killed before shard 1 was written ...
    (out / "parts" / ".shard-00001.jsonl.123.tmp").write_text('{"shard": 1}\n{"row": 5')  # ... mid-write
    assert audit(data["data"]["path"], out, "--overwrite", model=data["model"]) == 0
    err = capsys.readouterr().err
    assert "1 shard(s) audited, 2 already finished" in err
    for f in ("clusters.jsonl", "captions.jsonl", "unreadable.jsonl"):
        assert (out / f).read_text() == (scored / f).read_text()


def test_other_settings_do_not_reuse_shards(scored, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(scored, out)
    for f in ("audit.json", "clusters.jsonl", "captions.jsonl", "unreadable.jsonl", "audit.html"):
        (out / f).unlink()
    data = json.loads((scored / "audit.json").read_text())["data"]["path"]
    assert audit(data, out) == 2  # --no-score: other settings than the parts on disk
    assert "shards of an audit with other settings" in capsys.readouterr().err


def test_saved_dataset_and_parquet_give_the_same_clusters(tmp_path):
    import datasets

    rows = [r for r in folder_rows() if r[1] is not None]
    ds = datasets.Dataset.from_dict({"image": [r[1] for r in rows], "text": [r[2] for r in rows]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    got = []
    for src in ("saved", "pq"):
        assert audit(tmp_path / src, tmp_path / f"out_{src}", caption="text") == 0
        got.append(sorted(sorted(m["row"] for m in c["members"]) for c in jsonl(tmp_path / f"out_{src}" / "clusters.jsonl")))
    assert got[0] == got[1] == [[0, 1, 2, 3], [4, 5]]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("memreg audit: error")]
    assert len(err) == 1
    return err[0]


def test_bad_input_exits_2_with_one_line(audit_folder, tiny_sd_eps, tmp_path, capsys):
    assert audit(audit_folder, tmp_path / "o1", caption="prompt") == 2
    assert "no caption column 'prompt'" in one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    assert audit(empty, tmp_path / "o2") == 2
    one_error_line(capsys)
    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    for sub in ("text_encoder", "tokenizer", "scheduler"):
        (no_unet / sub).mkdir()
    assert audit(audit_folder, tmp_path / "o3", model=no_unet) == 2
    assert "no unet/ subfolder" in one_error_line(capsys)
    assert audit(tmp_path / "nowhere", tmp_path / "o4") == 2
    assert "does not exist" in one_error_line(capsys)
