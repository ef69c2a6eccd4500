"""Bad input to the commands: one line naming the flag, file, 1-based line and cause, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from memreg.cli import main


def _one_line(capsys) -> str:
    """The error line (the last one: a command may have printed progress before), no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert " error: " in line, err
    return line


@pytest.mark.parametrize("argv,message", [
    (["generate", "--tau", "nan"], "memreg generate: error: argument --tau: must be a finite number, got 'nan'"),
    (["generate", "--tau", "1", "--target=-inf"], "argument --target: must be a finite number, got '-inf'"),
    (["generate", "--calibrate", "c.txt", "--tau-quantile", "nan"], "argument --tau-quantile: must be a finite"),
    (["generate", "--tau", "1", "--guidance-scale", "inf"], "argument --guidance-scale: must be a finite number"),
    (["generate", "--tau", "1", "--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
    (["generate", "--tau", "1", "--guidance-scale", "-1"], "--guidance-scale must be >= 0, got -1.0"),
    (["detect", "--mem", "m.txt", "--nonmem", "n.txt", "--g1", "inf"], "argument --g1: must be a finite number"),
    (["detect", "--mem", "m.txt", "--nonmem", "n.txt", "--g2", "x"], "argument --g2: expected a number, got 'x'"),
])
def test_numeric_flags_must_be_finite_and_in_range(argv, message, tmp_path, capsys):
    command, rest = argv[0], argv[1:]
    common = ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")]
    if command == "generate":
        common += ["--prompts", str(tmp_path / "p.txt")]
    assert main([command, *common, *rest]) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "out").exists()


def _folder(root, lines: list[str], images: dict[str, bytes] | None = None):
    root.mkdir()
    for name, data in (images or {}).items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return root


def _audit(data, out) -> int:
    return main(["audit", "--data", str(data), "--out", str(out), "--caption-column", "caption", "--no-score",
                 "--calibration-images", "0"])


def _png(tmp_path, colour) -> bytes:
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8), colour).save(path)
    return path.read_bytes()


def test_audit_of_only_unreadable_images_exits_2(tmp_path, capsys):
    rows = [json.dumps({"file_name": f"bad{i}.png", "caption": "c"}) for i in range(3)]
    data = _folder(tmp_path / "d", rows, {f"bad{i}.png": b"not an image" for i in range(3)})
    assert _audit(data, tmp_path / "out") == 2
    line = _one_line(capsys)
    assert line == (f"memreg audit: error: --data {str(data)!r}: none of its 3 images could be read; the causes are "
                    f"listed in {tmp_path / 'out' / 'unreadable.jsonl'}")


@pytest.mark.parametrize("lines,message", [
    ([], "metadata.jsonl has no records"),
    (['{"file_name": "a.png", "caption": "c"}', "", '{"file_name": "a.png", "caption": '],
     "metadata.jsonl:3: not valid JSON"),                     # line 3 as an editor counts, blank line included
    (['{"file_name": "a.png", "caption": "c"}', '["a.png"]'], "metadata.jsonl:2: expected a JSON object, got list"),
    (['{"file_name": "a.png", "caption": "c"}', '{"file_name": "a.png", "caption": {"k": 1}}'],
     "metadata.jsonl:2: 'caption' is an object here but a string on line 1"),   # Arrow: "row 1", 0-based
    (['{"file_name": "../../etc/passwd", "caption": "c"}'],
     "metadata.jsonl:1: file_name '../../etc/passwd' leaves the data folder"),
])
def test_audit_names_the_metadata_line_and_cause(lines, message, tmp_path, capsys):
    data = _folder(tmp_path / "d", lines, {"a.png": _png(tmp_path, "red")})
    assert _audit(data, tmp_path / "out") == 2
    line = _one_line(capsys)
    assert message in line and line.startswith("memreg audit: error: ")
    if "leaves" in message:
        assert line.endswith("pass --allow-external-files to read it")


def test_audit_reads_external_files_only_when_allowed(tmp_path, capsys):
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(tmp_path, "blue"))
    data = _folder(tmp_path / "d", [json.dumps({"file_name": "link.png", "caption": "c"}),
                                    json.dumps({"file_name": "a.png", "caption": "d"})],
                   {"a.png": _png(tmp_path, "red")})
    (data / "link.png").symlink_to(outside)
    assert _audit(data, tmp_path / "out") == 2
    assert "metadata.jsonl:1: file_name 'link.png' is a symbolic link to" in _one_line(capsys)
    assert main(["audit", "--data", str(data), "--out", str(tmp_path / "out2"), "--caption-column", "caption",
                 "--no-score", "--calibration-images", "0", "--allow-external-files"]) == 0
    report = json.loads((tmp_path / "out2" / "audit.json").read_text())
    assert report["counts"]["rows"] == 2 and report["counts"]["unreadable"] == 0
