"""memreg.image_io: every image mode decodes to the 8-bit RGB a viewer shows, checked on hand-made pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from memreg.duplicates import content_hash
from memreg.image_io import ImageDecodeError, load_rgb


def _png_roundtrip(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def _rgb(source) -> np.ndarray:
    out = load_rgb(source)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_16_bit_grey_maps_its_full_range_onto_8_bits(tmp_path):
    # v * 255 / 65535, rounded: 0 -> 0, 25700 (= 100 * 257) -> 100, 65535 -> 255, 32768 -> 127.5... -> 128
    values = np.array([[0, 25700, 65535, 32768]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    path = tmp_path / "grey16.png"
    path.write_bytes(_png_roundtrip(im))
    with Image.open(path) as reread:
        assert reread.mode in ("I;16", "I")  # Pillow reads 16-bit PNGs as either
    for source in (im, path, path.read_bytes()):
        arr = _rgb(source)
        assert arr[0, :, 0].tolist() == [0, 100, 255, 128]
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_32_bit_integer_mode_is_read_as_16_bit_and_refused_beyond_it():
    im = Image.fromarray(np.array([[0, 65535, 514]], dtype=np.int32), mode="I")
    assert _rgb(im)[0, :, 0].tolist() == [0, 255, 2]     # 514 * 255 / 65535 = 2.0
    with pytest.raises(ImageDecodeError, match=r"mode I values span -5\.\.70000"):
        load_rgb(Image.fromarray(np.array([[-5, 70000]], dtype=np.int32), mode="I"))


def test_four_different_16_bit_images_are_four_different_images():
    """Before: convert('RGB') clipped every value above 255 to white, so the audit saw one image."""
    images = [Image.fromarray(np.full((8, 8), v, dtype=np.uint16)) for v in (5000, 20000, 40000, 60000)]
    assert len({content_hash(im) for im in images}) == 4
    assert [int(_rgb(im)[0, 0, 0]) for im in images] == [19, 78, 156, 233]   # rint(v * 255 / 65535)


def test_float_images_in_unit_or_byte_range():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert _rgb(unit)[0, :, 0].tolist() == [0, 128, 255]           # 127.5 rounds to even 128
    byte = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32), mode="F")
    assert _rgb(byte)[0, :, 0].tolist() == [0, 100, 255]
    with pytest.raises(ImageDecodeError, match=r"values span -1\.\.2"):
        load_rgb(Image.fromarray(np.array([[-1.0, 2.0]], dtype=np.float32), mode="F"))
    with pytest.raises(ImageDecodeError, match="non-finite"):
        load_rgb(Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32), mode="F"))


def test_transparency_is_composited_onto_white():
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [0, 255, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8), "RGBA")
    # hidden red -> white; opaque green stays; black at alpha 128: 0*128/255 + 255*(127/255) = 127
    assert _rgb(rgba)[0].tolist() == [[255, 255, 255], [0, 255, 0], [127, 127, 127]]
    la = Image.fromarray(np.array([[[100, 0], [100, 255]]], dtype=np.uint8), "LA")
    assert _rgb(la)[0].tolist() == [[255, 255, 255], [100, 100, 100]]


def test_palette_with_a_transparent_index(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))   # index 0 red, index 1 blue
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    path = tmp_path / "pal.png"
    path.write_bytes(_png_roundtrip(pal, transparency=0))          # index 0 is transparent
    assert _rgb(path)[0].tolist() == [[255, 255, 255], [0, 0, 255]]
    opaque = tmp_path / "opaque.png"
    opaque.write_bytes(_png_roundtrip(pal))
    assert _rgb(opaque)[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_cmyk_and_one_bit():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))        # no ink: white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))      # full cyan: R = 255 - C = 0
    assert _rgb(cmyk)[0].tolist() == [[255, 255, 255], [0, 255, 255]]
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    assert _rgb(bits)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8), "RGB")   # red | blue, 2 x 1
    exif = Image.Exif()
    exif[0x0112] = 6              # "rotate 90 clockwise to display": the left pixel ends on top
    path = tmp_path / "rotated.png"
    path.write_bytes(_png_roundtrip(im, exif=exif))
    arr = _rgb(path)
    assert arr.shape == (2, 1, 3)
    assert arr[:, 0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_unreadable_sources_name_the_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="does not exist"):
        load_rgb(tmp_path / "missing.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageDecodeError, match=r"broken\.png.*cannot be decoded"):
        load_rgb(bad)
    with pytest.raises(ImageDecodeError, match="dtype float64"):
        load_rgb(np.zeros((2, 2, 3)))
