from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from .common import HEIGHT, TEST_IMAGES, WIDTH, build_demo_model, demo_config, export_simplified, synth_images, torch_features


@dataclass
class Demo:
    model: object
    onnx: bytes
    config: Path
    parity_images: np.ndarray
    reference: np.ndarray
    calib_paths: list[Path]
    calib: np.ndarray
    folder: Path


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Demo:
    from reidbuild.images import load_images

    root = tmp_path_factory.mktemp("demo")
    cfg = demo_config(root)
    neck = load_images(synth_images(root / "neck", 32, seed=3), HEIGHT, WIDTH)
    model = build_demo_model(cfg, neck)
    data = export_simplified(model)
    parity = load_images(TEST_IMAGES, HEIGHT, WIDTH)
    calib_paths = synth_images(root / "calib", 16, seed=4)
    return Demo(model, data, cfg, parity, torch_features(model, parity), calib_paths,
                load_images(calib_paths, HEIGHT, WIDTH), root)
