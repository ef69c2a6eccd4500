"""memreg.demo.adherence.py: real scenes adhere, mismatched captions and photos do not."""

import numpy as np
from PIL import Image

from memreg.demo.adherence import mean_adherence, nearest_color, scene_adherence
from memreg.demo.data import Scene, all_scenes, load_photo, render_scene


def test_nearest_color_by_hand():
    assert nearest_color(np.array([250.0, 0, 0])) == "red"
    assert nearest_color(np.array([30.0, 30, 30])) == "black"


def test_rendered_scenes_score_one_at_demo_resolutions():
    rng = np.random.default_rng(0)
    scenes = all_scenes()[::23]
    for res in (16, 32):
        images = [render_scene(s, res, rng) for s in scenes]
        assert mean_adherence(images, scenes) >= 0.97


def test_wrong_caption_and_uniform_image_score_low():
    scene = Scene("circle", "red", "blue", "top left")
    img = render_scene(scene, 32, np.random.default_rng(1))
    swapped = Scene("circle", "blue", "red", "top left")
    assert scene_adherence(img, swapped)["adherence"] == 0.0
    gray = Image.new("RGB", (32, 32), (128, 128, 128))
    assert scene_adherence(gray, scene)["adherence"] == 0.0
    # The shape at another position: background right, shape colour wrong.
    moved = Scene("circle", "red", "blue", "bottom right")
    assert scene_adherence(img, moved) == {**scene_adherence(img, moved), "shape_ok": 0.0, "background_ok": 1.0}


def test_a_memorized_photo_does_not_adhere():
    photo = load_photo("astronaut", 32)
    scenes = all_scenes()[:40]
    assert mean_adherence([photo] * len(scenes), scenes) < 0.35
