"""memreg attack: bad input exits 2 with one line naming the file/row or flag, before any weights load."""

import json

import pytest

from memreg.cli import main
from .conftest import photo, write_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_sd_eps):
    root = tmp_path_factory.mktemp("cli")
    data = write_folder(root / "train", [("a.png", photo("coffee"), "a cup"), ("b.png", photo("coffee"), "a cup"),
                                         ("c.png", photo("moon"), "the moon")])
    control = write_folder(root / "control", [("x.png", photo("coins"), "coins")])
    return {"model": str(tiny_sd_eps), "data": str(data), "control": str(control), "root": root}


def _run(capsys, f, *extra, out="out"):
    argv = ["attack", "--model", f["model"], "--data", f["data"], "--control", f["control"],
            "--out", str(f["root"] / out), "--no-progress", *extra]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _meta_with(root, name, lines):
    d = root / name
    d.mkdir(exist_ok=True)
    photo("moon").save(d / "m.png")
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(d)


@pytest.mark.parametrize("flag,value,cause", [
    ("--steps", "0", "--steps: must be >= 1, got 0"),
    ("--draws", "-1", "--draws: must be >= 1, got -1"),
    ("--time-budget", "nan", "argument --time-budget: must be a finite number, got 'nan'"),
    ("--time-budget", "inf", "argument --time-budget: must be a finite number, got 'inf'"),
    ("--time-budget", "-3", "--time-budget: must be finite and > 0, got -3.0"),
    ("--lr", "0", "--lr: must be finite and > 0, got 0.0"),
    ("--attacks", "prompts,magic", "--attacks: unknown attack(s) ['magic']"),
])
def test_bad_flags(capsys, folders, flag, value, cause):
    code, err = _run(capsys, folders, flag, value)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"memreg attack: error: {cause}")
    assert not (folders["root"] / "out").exists()


def test_bad_files(capsys, folders):
    root = folders["root"]
    cases = [
        (dict(data=str(root / "nope")), "--data"),
        (dict(data=_meta_with(root, "badjson", ['{"file_name": "m.png", "text": "x"}', "{not json"])),
         "badjson/metadata.jsonl:2: not valid JSON"),
        (dict(data=_meta_with(root, "nofile", ['{"file_name": "gone.png", "text": "x"}'])),
         "nofile/metadata.jsonl:1: image file 'gone.png' does not exist"),
        (dict(data=_meta_with(root, "nocap", ['{"file_name": "m.png", "caption": "x"}'])),
         "nocap/metadata.jsonl:1: no caption column 'text'"),
        (dict(control=folders["data"]), "is also in --data; the control must hold images the model never saw"),
    ]
    (root / "empty").mkdir(exist_ok=True)
    cases.append((dict(control=str(root / "empty")), "empty/metadata.jsonl: missing"))
    undecodable = _meta_with(root, "undecodable", ['{"file_name": "m.png", "text": "x"}',
                                                   '{"file_name": "bad.png", "text": "x"}'])
    (root / "undecodable" / "bad.png").write_bytes(b"not an image")
    cases.append((dict(data=undecodable), "undecodable/metadata.jsonl:2: image"))
    cases.append((dict(data=_meta_with(root, "outside", ['{"file_name": "../bad.png", "text": "x"}'])),
                  "outside/metadata.jsonl:1: file_name '../bad.png' leaves the data folder"))
    for over, cause in cases:
        code, err = _run(capsys, dict(folders, **over))
        assert code == 2 and len(err) == 1 and err[0].startswith("memreg attack: error: "), (over, err)
        assert cause in err[0], (over, err)


def test_bad_clusters(capsys, folders):
    root = folders["root"]
    bad = root / "clusters_bad.jsonl"
    bad.write_text(json.dumps({"cluster": 0, "members": [{"sha256": "ab", "row": 0}]}) + "\n" + '{"cluster": 1}\n')
    code, err = _run(capsys, folders, "--clusters", str(bad))
    assert code == 2 and len(err) == 1 and "clusters_bad.jsonl:2: not a memreg audit cluster" in err[0]
    bad.write_text(json.dumps({"cluster": 7, "members": [{"sha256": "ab", "row": 0}]}) + "\n")
    code, err = _run(capsys, folders, "--clusters", str(bad))
    assert code == 2 and "clusters_bad.jsonl:1: cluster 7 matches no image of --data" in err[0]


def test_bad_model_and_lora(capsys, folders, tmp_path):
    code, err = _run(capsys, dict(folders, model=str(tmp_path)))
    assert code == 2 and len(err) == 1 and "has no unet/ subfolder" in err[0]
    code, err = _run(capsys, folders, "--lora", str(tmp_path))
    assert code == 2 and "pytorch_lora_weights.safetensors: missing" in err[0]
