"""Helpers shared by the GPU tests and scripts (not a conftest: plain imports work in every import mode)."""
from __future__ import annotations

from typing import Optional


def cuda_reason() -> Optional[str]:
    """Why CUDA cannot be used through cuda-python here, or None."""
    try:
        from reidbuild.tensorrt.env import import_cudart

        cudart = import_cudart()
    except ImportError:
        return "cuda-python is not installed"
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # noqa: BLE001
        return f"no CUDA GPU ({type(exc).__name__})"
    return None if int(err) == 0 and int(count) > 0 else "no CUDA GPU"
