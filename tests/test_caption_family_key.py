"""scripts/caption_family_key.py: families, components and the key figures on a hand-made training set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from memreg.testing import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "caption_family_key.py"


def test_family_normalises_and_sorts_tags():
    s = load_script(SCRIPT)
    assert s.family_of("A Red  Circle, on blue!", None) == "a red circle on blue"
    assert s.family_of("a black triangle and a green circle", " and ") == "a black triangle | a green circle"
    assert s.family_of("a green circle and a black triangle", " and ") == "a black triangle | a green circle"


def test_components_and_figures_by_hand():
    s = load_script(SCRIPT)
    labels = s.components(5, [(0, 1), (3, 4)])
    assert labels[0] == labels[1] != labels[2] and labels[3] == labels[4] != labels[0]
    rows = [{"group": "duplicated", "source": "p"}, {"group": "duplicated", "source": "p"},
            {"group": "duplicated", "source": "p"}, {"group": "unique"}, {"group": "unique"}]
    # rows 0, 1 one item with ordinary row 3; row 2 alone; row 4 alone
    st = s.key_stats(rows, np.array([0, 0, 1, 0, 2]))
    assert st["dup_rows_outside_their_photo_item"] == 1 and st["ordinary_rows_in_a_photo_item"] == 1
    assert st["ordinary_mean_item_size"] == (3 + 1) / 2


def test_main_on_a_tiny_folder(tmp_path, capsys):
    s = load_script(SCRIPT)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    rows = []
    for k, (c, cap, group) in enumerate([(0, "a red circle", "duplicated"), (0, "a red disc", "duplicated"),
                                         (1, "a green box", "unique"), (2, "a green box", "unique")]):
        img = np.zeros((32, 32, 3), np.uint8)
        img[:16] = colours[c]
        img[16:, :8 * (c + 1)] = 255
        Image.fromarray(img).save(tmp_path / f"{k}.png")
        rows.append({"file_name": f"{k}.png", "caption": cap, "group": group, "source": "p" if c == 0 else None})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert s.main(["--data", str(tmp_path), "--kind", "exact"]) == 0
    out = capsys.readouterr().out.splitlines()
    image, family = out[-2].split(), out[-1].split()
    # the two copies share pixels; the two ordinary images share a caption only: family items of 2
    assert image[-1] == "1.00" and family[-1] == "2.00"
