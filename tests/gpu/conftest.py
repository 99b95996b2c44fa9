"""GPU tests: run by scripts/gpu_check.sh on a machine with an NVIDIA GPU (and TensorRT for the engine tests);
everywhere else they are skipped with the reason."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .common import cuda_reason  # noqa: F401 (re-exported for old imports)


@pytest.fixture(scope="session")
def demo_gpu(tmp_path_factory):
    """The precision tests' vehicle (R18 256x128, calibrated BN neck) with its fp32/fp16/int8 ONNX."""
    from reidbuild.images import load_images
    from reidbuild.precision import convert_fp16, quantize_int8
    from tests.precision.common import (HEIGHT, TEST_IMAGES, WIDTH, build_demo_model, demo_config,
                                        export_simplified, synth_images, torch_features)

    root: Path = tmp_path_factory.mktemp("gpu")
    model = build_demo_model(demo_config(root), load_images(synth_images(root / "neck", 32, seed=3), HEIGHT, WIDTH))
    fp32 = export_simplified(model)
    calib = load_images(synth_images(root / "calib", 16, seed=4), HEIGHT, WIDTH)
    parity = load_images(TEST_IMAGES, HEIGHT, WIDTH)
    onnx = {"fp32": fp32, "fp16": convert_fp16(fp32)[0],
            "int8": quantize_int8(fp32, calib, method="percentile", workdir=root / "q")[0]}
    return {"model": model, "onnx": onnx, "parity": parity, "reference": torch_features(model, parity),
            "root": root, "x": np.ascontiguousarray(parity)}
