"""Image preprocessing: every image Pillow opens is accepted; broken ones are clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reidbuild.errors import ImageError
from reidbuild.images import load_image, load_images

REPO = Path(__file__).resolve().parent.parent


def test_test_data_loads_as_float_rgb_chw():
    paths = sorted((REPO / "test_data").iterdir())
    assert len(paths) == 12
    batch = load_images(paths, 64, 32)
    assert batch.shape == (12, 3, 64, 32) and batch.dtype == np.float32
    assert 0 <= batch.min() and batch.max() <= 255 and batch.std() > 10


def test_matches_pil_bicubic_rgb(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 20, 3), dtype=np.uint8))
    img.save(tmp_path / "a.png")
    want = np.asarray(img.resize((16, 32), Image.Resampling.BICUBIC), dtype=np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png", 32, 16), want)
    bgr = load_image(tmp_path / "a.png", 32, 16, color="BGR")
    np.testing.assert_array_equal(bgr, want[::-1])


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_modes_are_accepted(tmp_path, mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 10, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.new("I;16", (10, 20))
        img.putdata([int(v) * 300 for v in range(200)])
    else:
        img = base.convert(mode)
    ext = "tiff" if mode in ("CMYK", "I;16") else "png"
    img.save(tmp_path / f"a.{ext}")
    out = load_image(tmp_path / f"a.{ext}", 16, 8)
    assert out.shape == (3, 16, 8) and np.isfinite(out).all() and 0 <= out.min() and out.max() <= 255
    if mode == "I;16":
        assert out.max() > 200  # 16-bit values are scaled, not clipped to white or black


def test_one_pixel_and_animated(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.png")
    assert load_image(tmp_path / "one.png", 8, 4)[:, 0, 0].tolist() == [10, 20, 30]
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = load_image(tmp_path / "anim.gif", 8, 8)
    assert first[0].mean() > 200 and first[1].mean() < 50


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg", 20, 10, interpolation="nearest")
    assert out.shape == (3, 20, 10)
    assert out[0, :8].mean() > 200 and out[0, 12:].mean() < 50  # white half is now on top


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"not an image at all", "not an image"),
                                           (None, "corrupt or truncated")])
def test_broken_images_are_clear_errors(tmp_path, content, match):
    p = tmp_path / "bad.jpg"
    if content is None:
        Image.new("RGB", (64, 64), (1, 2, 3)).save(p, quality=90)
        p.write_bytes(p.read_bytes()[:200])
    else:
        p.write_bytes(content)
    with pytest.raises(ImageError, match=match) as ei:
        load_image(p, 16, 8)
    assert str(p) in str(ei.value)


def test_empty_list_is_an_error():
    with pytest.raises(ImageError):
        load_images([], 16, 8)
