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
