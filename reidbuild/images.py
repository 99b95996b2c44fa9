"""Image loading and preprocessing shared by parity, calibration and ``infer``.

Matches fast-reid's deploy inference: RGB, resize to W x H (bicubic by default), float32 0..255, CHW.
Any image Pillow can open is accepted (greyscale, palette, alpha, 16-bit, CMYK, animated: first frame,
EXIF orientation applied); anything else is an ImageError naming the file.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .errors import ImageError

if TYPE_CHECKING:
    from PIL import Image

_FILTERS = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST", "lanczos": "LANCZOS",
            "box": "BOX", "hamming": "HAMMING"}
MAX_PIXELS = 64_000_000  # refuse decompression bombs with a clear message


def _to_rgb(img: Image.Image) -> Image.Image:
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: Path, height: int, width: int, color: str = "RGB",
               interpolation: str = "bicubic") -> np.ndarray:
    """One image as float32 [3, H, W], channel order ``color``, values 0..255."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"{path}: cannot read image: {exc.strerror}") from None
    if size == 0:
        raise ImageError(f"{path}: image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"{path}: image is {img.width}x{img.height}; at most {MAX_PIXELS} pixels")
                img.seek(0)  # animated: first frame
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: image is too large (decompression bomb guard)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{path}: corrupt or truncated image ({why})") from None
    resized = rgb.resize((width, height), getattr(Image.Resampling, _FILTERS[interpolation]))
    arr = np.asarray(resized, dtype=np.float32)
    if color == "BGR":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_images(paths: Iterable[Path], height: int, width: int, color: str = "RGB",
                interpolation: str = "bicubic") -> np.ndarray:
    """Images as float32 [N, 3, H, W]; an empty list is an error (parity on nothing proves nothing)."""
    paths = list(paths)
    if not paths:
        raise ImageError("no images given")
    return np.stack([load_image(p, height, width, color, interpolation) for p in paths])
