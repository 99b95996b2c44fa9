"""Fixtures for graph patch tests (helpers live in tests/patches/util.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.patches.util import tiny_onnx


@pytest.fixture(scope="session")
def onnx_bytes() -> bytes:
    """Tiny Conv/BN/ReLU/MaxPool/GAP/Flatten/Gemm model, input [batch,3,16,8] 0..255, output [batch,4]."""
    return tiny_onnx(dynamic=True)


@pytest.fixture(scope="session")
def onnx_fixed_bytes() -> bytes:
    return tiny_onnx(dynamic=False)


@pytest.fixture()
def onnx_file(tmp_path: Path, onnx_bytes: bytes) -> Path:
    p = tmp_path / "m.onnx"
    p.write_bytes(onnx_bytes)
    return p
