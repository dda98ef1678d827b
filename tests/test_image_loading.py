"""Odd but valid images are converted; huge ones decode small; broken files raise one clear ImageLoadError."""

from __future__ import annotations

import io
import resource

import numpy as np
import pytest
from PIL import Image

from fiftyone_diffusion.brain.image_loading import ImageLoadError, load_rgb


def _save(im: Image.Image, path, **kw) -> str:
    im.save(path, **kw)
    return str(path)


def test_odd_modes_become_8bit_rgb(tmp_path):
    gray = _save(Image.new("L", (40, 30), 200), tmp_path / "gray.png")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba = _save(rgba, tmp_path / "rgba.png")
    pal = _save(Image.new("RGB", (40, 30), (0, 0, 255)).convert("P"), tmp_path / "pal.png")
    deep = _save(Image.fromarray(np.full((30, 40), 65535, np.uint16)), tmp_path / "deep16.png")
    cmyk = _save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    for path in (gray, rgba, pal, deep, cmyk):
        im, _ = load_rgb(path)
        assert im.mode == "RGB" and im.size == (40, 30), path
    assert Image.open(deep).mode.startswith("I")
    assert load_rgb(gray)[0].getpixel((5, 5)) == (200, 200, 200)
    assert load_rgb(deep)[0].getpixel((5, 5)) == (255, 255, 255)  # 16-bit white is white, not clipped noise
    assert load_rgb(rgba)[0].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    assert load_rgb(pal)[0].getpixel((5, 5)) == (0, 0, 255)
    r, g, b = load_rgb(cmyk)[0].getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red


def test_huge_jpeg_is_decoded_at_reduced_size(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("L", (10000, 10000), 128).save(path, quality=50)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    im, decode = load_rgb(str(path), min_size=224)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert decode.startswith("jpeg-draft-1/8") and min(im.size) >= 224 and max(im.size) <= 1250
    assert grown_mb < 60  # a full decode would need 100 MB (gray) / 300 MB (RGB)


@pytest.mark.slow
def test_huge_png_is_decoded_and_reduced(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (10000, 10000), 50).save(path)
    im, decode = load_rgb(str(path), min_size=224)
    assert "reduce" in decode and im.mode == "RGB" and 224 <= min(im.size) < 2 * 224 + 10
    limited = tmp_path / "over.png"
    Image.new("1", (20000, 10000)).save(limited)
    with pytest.raises(ImageLoadError, match="pixel limit"):
        load_rgb(str(limited), max_pixels=100_000_000)


def test_broken_files_raise_one_line_errors(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good, format="JPEG")
    data = good.getvalue()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    names = ["truncated.jpg", "corrupt.png", "empty.jpg", "text.jpg", "missing.png"]
    for name in names:
        with pytest.raises(ImageLoadError) as e:
            load_rgb(str(tmp_path / name))
        assert "\n" not in str(e.value) and str(e.value), name
