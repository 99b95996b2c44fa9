"""The pooling-rounding bug the old hand-edited prototxts hid: PyTorch rounds down, stock Caffe rounds up.

A 3x3/2 max-pool with padding 1 on 256x128 gives 128x64 in PyTorch and 129x65 in stock Caffe. Both dialects
must give PyTorch's shape and PyTorch's values: ``ceil_mode`` by writing ``ceil_mode: false``, ``bvlc`` (no
such field) by slicing Caffe's extra last row/column off.

Max pooling picks one input value per window, so the values must be *equal* (no tolerance); average pooling
divides a 9-term float32 sum, and Caffe and PyTorch sum in different orders: rtol=1e-6, atol=1e-6 (a few ulp).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
from torch import nn

from tests.caffe._util import DIALECTS, RUNTIMES, blob_shapes, export, need, rand, run_caffe, torch_ref, write_caffe


class Pool(nn.Module):
    def __init__(self, kind: str, ceil: bool = False, pad: int = 1) -> None:
        super().__init__()
        self.p = (nn.MaxPool2d(3, 2, pad, ceil_mode=ceil) if kind == "max"
                  else nn.AvgPool2d(3, 2, pad, ceil_mode=ceil))

    def forward(self, x):
        return self.p(x)


SIZES = [(256, 128), (9, 7), (8, 6), (7, 10)]


@functools.lru_cache(maxsize=None)
def _onnx(kind: str, shape: tuple[int, ...], ceil: bool = False, pad: int = 1):
    return export(Pool(kind, ceil, pad), shape)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_floor_pooling_shapes_and_values_equal_pytorch(hw, kind, dialect, runtime, tmp_path):
    need(runtime)
    shape = (2, 2) + hw
    module = Pool(kind)
    x = rand(shape, seed=3)
    ref = torch_ref(module, x)
    proto, caffemodel, text = write_caffe(tmp_path, _onnx(kind, shape), dialect, shape)
    if dialect == "ceil_mode":
        assert "ceil_mode: false" in text and '"Slice"' not in text
    else:
        assert "ceil_mode" not in text
    out = run_caffe(proto, caffemodel, runtime, x).reshape(ref.shape)
    if kind == "max":
        np.testing.assert_array_equal(out, ref)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    if runtime == "pycaffe":
        assert blob_shapes(proto, caffemodel, x)["output"] == ref.shape


def test_bvlc_slices_off_the_row_and_column_stock_caffe_adds(tmp_path):
    """The headline case on real Caffe: the raw ceil pooling is 129x65, the net's output 128x64 like PyTorch."""
    need("pycaffe")
    shape = (1, 1, 256, 128)
    module = Pool("max")
    x = rand(shape, seed=4)
    proto, caffemodel, text = write_caffe(tmp_path, export(module, shape), "bvlc", shape)
    assert '"Slice"' in text and '"Silence"' in text
    shapes = blob_shapes(proto, caffemodel, x)
    raw = [s for name, s in shapes.items() if name not in ("input", "output") and s[2:] == (129, 65)]
    assert raw, f"expected Caffe's ceil-rounded 129x65 pooling blob, got {shapes}"
    assert shapes["output"] == (1, 1, 128, 64) == torch_ref(module, x).shape


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("hw", [(32, 16), (33, 17), (31, 12)], ids=["32x16", "33x17", "31x12"])
def test_ceil_mode_pooling_like_the_fastreid_stem(hw, dialect, tmp_path):
    """fast-reid's stem max-pool: 3x3/2, no padding, ceil_mode=True (both dialects round up here)."""
    need("pycaffe")
    shape = (2, 2) + hw
    module = Pool("max", ceil=True, pad=0)
    x = rand(shape, seed=5)
    ref = torch_ref(module, x)
    proto, caffemodel, text = write_caffe(tmp_path, _onnx("max", shape, True, 0), dialect, shape)
    assert ("ceil_mode: true" in text) == (dialect == "ceil_mode")
    for runtime in RUNTIMES:
        need(runtime)
        out = run_caffe(proto, caffemodel, runtime, x).reshape(ref.shape)
        np.testing.assert_array_equal(out, ref)
