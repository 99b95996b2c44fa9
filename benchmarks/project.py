"""Benchmark projects: fast-reid bag-of-tricks R50 (or R101) at 256x128 with trained-like weights, person-like
images.

Seeded random weights give features that are nearly the same for every image (a parity check on them proves
little, and int8 looks better than it is), so the benchmark builds its checkpoint with
``reidbuild.testing.make_trained_like``: seeded weights, BatchNorm statistics measured on person-like images.
Nothing is downloaded; everything lives in the folder the caller gives.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "market1501" / "bagtricks_R50" / "config.yml"


def write_images(folder: Path, images: np.ndarray, prefix: str = "p") -> list[Path]:
    """float32 NCHW 0..255 images as PNG files (what a user would point a manifest at)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(np.clip(np.round(img.transpose(1, 2, 0)), 0, 255).astype(np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


def r101_config(root: Path) -> Path:
    """The R50 config with a 101-layer backbone (what fast-reid's bagtricks_R101-ibn is, less IBN), written under
    ``root``: the repository ships no R101 config."""
    config = root / "bagtricks_R101.yml"
    config.write_text(f"_BASE_: {CONFIG}\nMODEL:\n  BACKBONE:\n    DEPTH: 101x\n")
    return config


def make_r50_project(root: Path, parity_images: int = 12, bn_images: int = 64, extra: str = "",
                     depth: int = 50) -> Path:
    """Write a trained-like R50 (or R``depth``: 50 or 101) checkpoint, ``parity_images`` images and a manifest
    ``r<depth>.yml`` under ``root``."""
    from reidbuild.fastreid import build_model
    from reidbuild.fastreid.checkpoint import make_checkpoint
    from reidbuild.fastreid.config import load_config
    from reidbuild.testing import make_trained_like, person_like_images

    if depth not in (50, 101):
        raise ValueError(f"depth {depth}: the benchmark projects are R50 and R101")
    config = r101_config(root) if depth == 101 else CONFIG
    ckpt = root / "model_final.pth"
    if not ckpt.exists():
        model = build_model(load_config(config))
        make_trained_like(model, person_like_images(bn_images, 256, 128, seed=1), seed=0)
        make_checkpoint(model, ckpt)
    write_images(root / "images", person_like_images(parity_images, 256, 128, seed=2))
    manifest = root / f"r{depth}.yml"
    manifest.write_text(textwrap.dedent(f"""\
        version: 1
        name: bench_r{depth}
        source:
          format: fastreid
          config: {config}
          weights: model_final.pth
        input:
          height: 256
          width: 128
        output_dir: outputs
        targets:
          onnx:
            opset: 17
            simplify: true
            dynamic_batch: true
          caffe:
            dialect: ceil_mode
        parity:
          images: images/*.png
          backends: [onnxruntime, caffe]
          atol: 1.0e-3   # features of a trained-like R50 are O(0.1): 1e-6 absolute is below float32 noise
        """) + textwrap.dedent(extra))
    return manifest


def r50_onnx(root: Path) -> bytes:
    """The benchmark R50 exported and simplified as the pipeline does (for bench_int8.py on its own)."""
    import onnx
    import onnxsim

    from reidbuild.fastreid import build_model
    from reidbuild.fastreid.config import load_config
    from reidbuild.stages.onnx import export_onnx
    from reidbuild.testing import make_trained_like, person_like_images

    model = build_model(load_config(CONFIG))
    make_trained_like(model, person_like_images(64, 256, 128, seed=1), seed=0)
    simplified, _ = onnxsim.simplify(onnx.load_from_string(export_onnx(model, 256, 128, 17, True)))
    return simplified.SerializeToString(deterministic=True)
