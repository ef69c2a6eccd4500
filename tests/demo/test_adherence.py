"""memreg.demo.adherence.py: real scenes adhere, mismatched captions and photos do not; only named parts count."""

import numpy as np
from PIL import Image, ImageDraw

from memreg.demo.adherence import mean_adherence, nearest_color, scene_adherence
from memreg.demo.data import PHOTOS, DemoDataConfig, WorldConfig, load_photo, pretrain_rows

EVERYTHING_NAMED = WorldConfig(p_background=0.3, p_position=0.3)


def test_nearest_color_by_hand():
    assert nearest_color(np.array([250.0, 0, 0])) == "red"
    assert nearest_color(np.array([30.0, 30, 30])) == "black"


def test_rendered_scenes_score_near_one_at_demo_resolutions():
    for res, world in ((16, WorldConfig()), (16, EVERYTHING_NAMED), (32, EVERYTHING_NAMED)):
        rows = pretrain_rows(200, DemoDataConfig(resolution=res, world=world))
        assert mean_adherence([i for i, _ in rows], [m["named"] for _, m in rows]) >= 0.97


def test_shuffled_captions_and_photos_score_low():
    rows = pretrain_rows(200, DemoDataConfig(resolution=16, world=EVERYTHING_NAMED))
    named = [m["named"] for _, m in rows]
    shuffled = named[1:] + named[:1]
    assert mean_adherence([i for i, _ in rows], shuffled) < 0.35
    # A photo answers a caption only where it happens to hold the named colour; the colour wheel holds
    # every colour, which is what a colour proxy cannot tell from adherence.
    named = [m["named"] for _, m in pretrain_rows(200, DemoDataConfig(resolution=16))]
    for name in PHOTOS:
        got = mean_adherence([load_photo(name, 16)] * len(named), named)
        assert got > 0.9 if name == "colorwheel" else got < 0.6


def _canvas(bg=(40, 70, 220)):
    img = Image.new("RGB", (16, 16), bg)
    return img, ImageDraw.Draw(img)


def test_checks_by_hand():
    img, draw = _canvas()                                   # blue background
    draw.rectangle([2, 2, 5, 5], fill=(220, 40, 40))        # 16 red pixels (6%), centroid (4/16, 4/16)
    only_colour = scene_adherence(img, {"color": "red", "shape": "circle"})
    assert only_colour["adherence"] == 1.0                  # the shape is not checked; nothing else is named
    full = scene_adherence(img, {"color": "red", "shape": "square", "background": "blue", "position": "top left"})
    assert (full["color0_ok"], full["background_ok"], full["position_ok"]) == (1.0, 1.0, 1.0)
    wrong = scene_adherence(img, {"color": "red", "shape": "square", "background": "green", "position": "bottom right"})
    assert wrong["adherence"] == 1 / 3
    pair = scene_adherence(img, {"color": "red", "shape": "square", "pair": {"color": "white", "shape": "cross"}})
    assert (pair["color0_ok"], pair["color1_ok"], pair["adherence"]) == (1.0, 0.0, 0.5)
    # 4 red pixels (1.6% < 2%): a distractor-sized speck does not count as the named shape
    img, draw = _canvas()
    draw.rectangle([2, 2, 3, 3], fill=(220, 40, 40))
    assert scene_adherence(img, {"color": "red", "shape": "square"})["adherence"] == 0.0
    # the named colour as the background is not a shape of that colour
    img, _ = _canvas(bg=(220, 40, 40))
    assert scene_adherence(img, {"color": "red", "shape": "square"})["adherence"] == 0.0
