"""Write test_data/: a dozen small, deterministic, person-ish images in varied sizes and modes.

Run: python scripts/make_test_data.py  (the images are committed; re-running gives the same pixels)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "test_data"

# (file name, width, height, mode, format)
SPECS = [
    ("p00_rgb.jpg", 64, 128, "RGB", "JPEG"),
    ("p01_rgb.jpg", 48, 96, "RGB", "JPEG"),
    ("p02_rgb.jpg", 100, 220, "RGB", "JPEG"),
    ("p03_rgb.png", 64, 128, "RGB", "PNG"),
    ("p04_grey.jpg", 60, 140, "L", "JPEG"),
    ("p05_grey.png", 32, 64, "L", "PNG"),
    ("p06_alpha.png", 64, 128, "RGBA", "PNG"),
    ("p07_palette.png", 50, 110, "P", "PNG"),
    ("p08_wide.jpg", 128, 96, "RGB", "JPEG"),
    ("p09_tiny.png", 12, 24, "RGB", "PNG"),
    ("p10_large.jpg", 256, 512, "RGB", "JPEG"),
    ("p11_rgb.jpg", 72, 150, "RGB", "JPEG"),
]


def person(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A background gradient with a head, torso and legs in random colours: varied, smooth, JPEG-friendly."""
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3)
    grad = rng.uniform(-60, 60, 3)
    bg = base[None, None, :] + grad[None, None, :] * (y[..., None] / h) + rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    cx = w * rng.uniform(0.4, 0.6)
    col = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))
    d.ellipse([cx - w * 0.12, h * 0.05, cx + w * 0.12, h * 0.18], fill=col())
    d.rectangle([cx - w * 0.25, h * 0.2, cx + w * 0.25, h * 0.55], fill=col())
    d.rectangle([cx - w * 0.2, h * 0.55, cx - w * 0.02, h * 0.95], fill=col())
    d.rectangle([cx + w * 0.02, h * 0.55, cx + w * 0.2, h * 0.95], fill=col())
    return img


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for i, (name, w, h, mode, fmt) in enumerate(SPECS):
        img = person(np.random.default_rng(1000 + i), w, h)
        if mode == "RGBA":
            a = Image.new("L", img.size, 255)
            ImageDraw.Draw(a).rectangle([0, 0, w // 4, h], fill=0)
            img.putalpha(a)
        elif mode == "P":
            img = img.quantize(colors=32, method=Image.Quantize.MEDIANCUT)
        elif mode != "RGB":
            img = img.convert(mode)
        kwargs = {"quality": 90} if fmt == "JPEG" else {"optimize": False}
        img.save(OUT / name, fmt, **kwargs)
    print(f"wrote {len(SPECS)} images to {OUT}")


if __name__ == "__main__":
    main()
