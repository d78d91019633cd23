"""Image validation and conversion: every bad file is named, every odd mode becomes RGB."""

import logging

import numpy as np
import pytest
from PIL import Image

from images_util import exif_rotated_jpeg, png_bomb, truncated_jpeg
from suti.errors import InputError
from suti.images import fit_square, list_image_files, load_image


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.jpg: the file is empty"):
        load_image(tmp_path / "empty.jpg")


def test_text_file_named_like_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(InputError, match=r"notes\.png: not a readable image"):
        load_image(tmp_path / "notes.png")


def test_truncated_jpeg(tmp_path):
    with pytest.raises(InputError, match=r"cut\.jpg: corrupt or truncated"):
        load_image(truncated_jpeg(tmp_path / "cut.jpg"))


def test_decompression_bomb(tmp_path):
    with pytest.raises(InputError, match=r"bomb\.png: .*decompression bomb"):
        load_image(png_bomb(tmp_path / "bomb.png"))


def test_folder_without_images(tmp_path):
    (tmp_path / "caption.txt").write_text("a dog")
    with pytest.raises(InputError, match="contains no images"):
        list_image_files(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        list_image_files(tmp_path / "missing")


def test_exif_orientation_is_honoured(tmp_path):
    img = load_image(exif_rotated_jpeg(tmp_path / "rot.jpg", 60, 40))
    assert img.size == (40, 60)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(tmp_path, mode):
    if mode == "I;16":
        arr = np.full((20, 30), 65535, dtype=np.uint16)
        arr[:, :15] = 0
        img = Image.fromarray(arr)
        assert img.mode.startswith("I")
    else:
        img = Image.new("RGB", (30, 20), (255, 255, 255)).convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":  # 16-bit scaled to 8-bit, not clipped
        assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((29, 0)) == (255, 255, 255)


def test_rgba_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)


def test_small_images_are_upscaled_with_a_warning(caplog, monkeypatch):
    import suti.images

    monkeypatch.setattr(suti.images, "_UPSCALE_WARNED", set())  # another test may have warned for this file
    with caplog.at_level(logging.WARNING):
        out = fit_square(Image.new("RGB", (20, 10)), 32, name="small.png")
    assert out.size == (32, 32)
    assert "small.png" in caplog.text and "upscaling" in caplog.text


def test_a_stream_of_small_unnamed_images_warns_once(caplog, monkeypatch):
    import suti.images

    monkeypatch.setattr(suti.images, "_UPSCALE_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="suti.images"):
        for size in [16] * 50 + list(range(17, 30)):  # a training stream of crawled sizes: one line, not 63
            fit_square(Image.new("RGB", (size, size + 3)), 32)
        fit_square(Image.new("RGB", (64, 64)), 32)  # downscaling: no warning
        fit_square(Image.new("RGB", (16, 16)), 48)  # another resolution: its own line
        for name in ("a.png", "b.png", "a.png"):  # named files: once each
            fit_square(Image.new("RGB", (16, 16)), 32, name=name)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert "resolution 32 (this one 16x19)" in lines[0] and "resolution 48" in lines[1]
    assert lines[2].startswith("a.png:") and lines[3].startswith("b.png:")


@pytest.mark.parametrize("values, grey", [
    (0.5, 127),  # a float image in [0, 1]: mid grey, not black
    (1.0, 255),
    (128.0, 128),  # a float image in [0, 255]
    (40000.0, 155),  # a float image in the 16-bit range
])
def test_float_images_load_in_their_intended_range(tmp_path, values, grey):
    arr = np.full((8, 8), values, dtype=np.float32)
    arr[0, 0] = 0.0
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    img = load_image(tmp_path / "f.tif")
    assert img.mode == "RGB" and abs(int(np.asarray(img)[4, 4, 0]) - grey) <= 1


@pytest.mark.parametrize("value", [-1.0, 70000.0, float("nan")])
def test_float_images_outside_every_range_are_refused_naming_the_file(tmp_path, value):
    arr = np.full((8, 8), value, dtype=np.float32)
    Image.fromarray(arr, mode="F").save(tmp_path / "bad.tif")
    with pytest.raises(InputError, match=r"bad\.tif: a mode-F image with values"):
        load_image(tmp_path / "bad.tif")


def test_32_bit_integer_images_load_in_their_range(tmp_path):
    Image.fromarray(np.full((8, 8), 200, dtype=np.int32), mode="I").save(tmp_path / "i.tif")
    assert int(np.asarray(load_image(tmp_path / "i.tif"))[0, 0, 0]) == 200


def test_a_broken_link_in_an_image_folder_is_refused_naming_it(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(InputError, match=r"b\.png: a broken link"):
        list_image_files(tmp_path)
