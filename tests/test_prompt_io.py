"""memreg.prompt_io.read_prompts: txt and jsonl prompt lists, blank lines, and bad files."""

from __future__ import annotations

import json

import pytest

from memreg.prompt_io import PromptFileError, read_prompts


def test_txt_strips_and_counts_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red car\n\n  a dog on a beach  \n   \nthe moon\n\n", encoding="utf-8")
    pl = read_prompts(f)
    assert pl.prompts == ["a red car", "a dog on a beach", "the moon"]
    assert pl.blank_lines == 3
    assert pl.path == str(f)


def test_jsonl_caption_field(tmp_path):
    f = tmp_path / "p.jsonl"
    lines = [json.dumps({"caption": "a red car", "url": "x"}), "", json.dumps({"caption": "  "}),
             json.dumps({"caption": "café ☕ poster", "index": 3})]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pl = read_prompts(f)
    assert pl.prompts == ["a red car", "café ☕ poster"]
    assert pl.blank_lines == 2  # the empty line and the whitespace-only caption


def test_jsonl_missing_caption_names_file_line_and_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"caption": "ok"}) + "\n\n" + json.dumps({"text": "no caption"}) + "\n", encoding="utf-8")
    with pytest.raises(PromptFileError) as e:
        read_prompts(f)
    msg = str(e.value)
    assert str(f) in msg and ":3:" in msg and "caption" in msg


def test_jsonl_invalid_json_names_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"caption": "ok"}\n{"caption": \n', encoding="utf-8")
    with pytest.raises(PromptFileError, match=r":2: not valid JSON"):
        read_prompts(f)


def test_empty_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n   \n", encoding="utf-8")
    with pytest.raises(PromptFileError, match="has no prompts") as e:
        read_prompts(f)
    assert str(f) in str(e.value)


def test_missing_file(tmp_path):
    f = tmp_path / "nope.txt"
    with pytest.raises(PromptFileError, match="does not exist") as e:
        read_prompts(f)
    assert str(f) in str(e.value)


def test_directory_is_not_a_prompt_file(tmp_path):
    with pytest.raises(PromptFileError):
        read_prompts(tmp_path)


def test_shared_lists_read(shared_prompts):
    for name in ("sd1_mem.txt", "sd1_nmem.txt", "sd2_mem.txt", "sd2_nmem.txt", "sd1_mem.jsonl"):
        pl = read_prompts(shared_prompts / name)
        assert len(pl.prompts) > 100
        assert all(p == p.strip() and p for p in pl.prompts)


def test_binary_file_is_a_named_error(tmp_path):
    f = tmp_path / "prog.txt"
    f.write_bytes(b"a red car\n\x7fELF\x02\x01\x01\x00\x00\n")
    with pytest.raises(PromptFileError, match=r"prog.txt:2: contains NUL bytes"):
        read_prompts(f)


def test_non_utf8_line_is_named_with_its_line_and_column(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("a red car\n\nun caf\u00e9\n".encode("latin-1"))  # line 3: 'caf' + 0xe9
    with pytest.raises(PromptFileError, match=r"latin1.txt:3: not UTF-8 text \(byte 0xe9 at column 7\)"):
        read_prompts(f)


def test_utf8_bom_is_dropped(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffa red car\nthe moon\n".encode("utf-8"))
    assert read_prompts(f).prompts == ["a red car", "the moon"]


def test_detect_cli_names_a_binary_prompt_file_with_exit_2(tmp_path, capsys):
    from memreg.cli import main

    ok = tmp_path / "ok.txt"
    ok.write_text("a red car\n", encoding="utf-8")
    rc = main(["detect", "--model", str(tmp_path / "no_model"), "--mem", "/bin/ls", "--nonmem", str(ok),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--mem" in err and "/bin/ls:" in err and "Traceback" not in err
