"""The images every self-check runs on: the manifest's parity images, or deterministic person-like images.

Why: a self-check (export, simplify, graph patch, fp16/int8 smoke test) proves that a tool did not break the
model, so it must feed what a camera could produce. Uniform noise in 0..255 is no such input: fast-reid models
with GeM pooling and non-local blocks give NaN or values of 1e9 on it (and so does PyTorch), which blamed the
exporter for the model's own behaviour. The parity images are preprocessed exactly like parity; without a
parity section, ``person_like_images`` (smooth backgrounds, a figure in varied colours, mild sensor noise)
stands in. Both are deterministic, so a self-check gives the same verdict on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # imported where used: the planning path (assemble reads PROBE_COUNT) never loads numpy
    import numpy as np

PROBE_COUNT = 4  # images per self-check: enough to see a broken graph, cheap on 2 CPU cores


@dataclass(frozen=True)
class Probe:
    """A self-check's input batch (float32 NCHW 0..255, preprocessed like parity) and what it is."""

    images: np.ndarray
    names: list[str]
    source: str  # "parity images" | "person-like images"

    def describe(self) -> dict[str, object]:
        """What the lock records about the check input."""
        return {"source": self.source, "images": self.names}


def person_like_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` deterministic person-like images (float32 NCHW, 0..255): smooth backgrounds, a figure
    in varied colours, mild sensor noise. Enough variety to measure BatchNorm statistics and to give each image
    its own feature, with the value range and smoothness of a photograph; nothing is downloaded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((count, 3, height, width), np.float32)
    for i in range(count):
        bg = rng.uniform(30, 220, 3)[:, None, None] + rng.uniform(-70, 70, 3)[:, None, None] * (y / height)
        img = np.broadcast_to(bg, (3, height, width)).copy()
        cx = width * rng.uniform(0.35, 0.65)
        parts = [(0.08, 0.2, 0.10), (0.2, 0.55, 0.22), (0.55, 0.95, 0.16)]  # head, torso, legs
        for top, bottom, half in parts:
            colour = rng.uniform(0, 255, 3)[:, None]
            mask = (y >= top * height) & (y < bottom * height) & (np.abs(x - cx) < half * width)
            img[:, mask] = colour
        img += rng.normal(0, 5, img.shape).astype(np.float32)
        out[i] = np.clip(img, 0, 255)
    return out


def probe_images(height: int, width: int, color: str = "RGB", interpolation: str = "bicubic",
                 paths: Optional[Sequence[Path]] = None, count: int = PROBE_COUNT) -> Probe:
    """The first ``count`` of ``paths`` (sorted parity images) preprocessed like parity, or, with none,
    ``count`` person-like images (seed 0) in the model's channel order."""
    if paths:
        from .images import load_images

        chosen = list(paths)[:count]
        return Probe(load_images(chosen, height, width, color, interpolation), [Path(p).name for p in chosen],
                     "parity images")
    import numpy as np

    images = person_like_images(count, height, width, seed=0)
    if color == "BGR":
        images = np.ascontiguousarray(images[:, ::-1])
    return Probe(images, [f"person-like #{i}" for i in range(count)], "person-like images")
