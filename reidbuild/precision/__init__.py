"""Reduced-precision ONNX for TensorRT's strongly typed builds: fp16 graphs and int8 Q/DQ graphs.

All numerics are decided here, in ONNX, where onnxruntime checks them on the CPU before any engine is
built (TensorRT 11 has no precision flags or calibrators any more).
"""
from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; loaded on first use, so planning (a no-op apply reads ``profiles``) never imports numpy
_LAZY = {"KEEP_FP32_OPS": "fp16", "convert_fp16": "fp16", "METHODS": "int8", "QUANT_OPS": "int8",
         "quantize_int8": "int8", "scales_digest": "int8", "default_tolerance": "profiles"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
