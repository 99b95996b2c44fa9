"""Reduced-precision ONNX for TensorRT's strongly typed builds: fp16 graphs and int8 Q/DQ graphs.

All numerics are decided here, in ONNX, where onnxruntime checks them on the CPU before any engine is
built (TensorRT 11 has no precision flags or calibrators any more).
"""
from __future__ import annotations

from .fp16 import KEEP_FP32_OPS, convert_fp16
from .int8 import METHODS, QUANT_OPS, quantize_int8, scales_digest
from .profiles import default_tolerance

__all__ = ["KEEP_FP32_OPS", "METHODS", "QUANT_OPS", "convert_fp16", "default_tolerance", "quantize_int8",
           "scales_digest"]
