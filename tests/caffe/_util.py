"""Helpers for the Caffe tests: torch -> ONNX (opset 17, TorchScript exporter, onnxsim) -> Caffe -> run."""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reidbuild.backends.caffe import CaffeRunner, available
from reidbuild.caffe.convert import convert

RUNTIMES = ("pycaffe", "opencv")
DIALECTS = ("bvlc", "ceil_mode")


def need(runtime: str) -> None:
    """Fail unless ``runtime`` can run here: ``make test`` builds pycaffe and installs OpenCV, so a missing one is
    a broken setup, not a reason to skip; the message says how to get it (e.g. `make pycaffe`)."""
    why = available(runtime)
    if why is not None:
        pytest.fail(f"Caffe runtime {runtime} is missing (make test installs it): {why}")


def export(module: Any, shape: tuple[int, ...], *, dynamic_batch: bool = True, simplify: bool = True) -> Any:
    """The ONNX model reidbuild's ONNX stages would make of ``module`` (input ``input``, output ``output``)."""
    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(*shape),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"], do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None)
    model = onnx.load_from_string(buf.getvalue())
    if simplify:
        import onnxsim

        model, ok = onnxsim.simplify(model)
        assert ok
    return model


def torch_ref(module: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def write_caffe(tmp_path: Path, model: Any, dialect: str, shape: tuple[int, int, int, int],
                tag: str = "net") -> tuple[Path, Path, str]:
    text, weights = convert(model, dialect, shape)
    proto, caffemodel = tmp_path / f"{tag}_{dialect}.prototxt", tmp_path / f"{tag}_{dialect}.caffemodel"
    proto.write_text(text)
    caffemodel.write_bytes(weights)
    return proto, caffemodel, text


def run_caffe(proto: Path, caffemodel: Path, runtime: str, x: np.ndarray) -> np.ndarray:
    """Features from a real Caffe runtime, shaped like the runner returns them ([N, D])."""
    return CaffeRunner(proto, caffemodel, runtime).infer(x)


def blob_shapes(proto: Path, caffemodel: Path, x: np.ndarray) -> dict[str, tuple[int, ...]]:
    """Every blob's shape after a pycaffe forward."""
    need("pycaffe")
    import caffe  # type: ignore[import-not-found]

    net = caffe.Net(str(proto), str(caffemodel), caffe.TEST)
    net.blobs["input"].data[...] = x
    net.forward()
    return {k: tuple(v.data.shape) for k, v in net.blobs.items()}


def rand(shape: tuple[int, ...], seed: int = 0, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)
