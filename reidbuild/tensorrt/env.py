"""What a TensorRT engine is tied to, read with cuda-python, and how to tell a user it does not fit here.

An engine runs only with the TensorRT version that built it, on the GPU architecture it was built for
(the plan holds kernels chosen for that compute capability). The CUDA runtime and driver versions are
recorded for diagnosis; they do not by themselves invalidate an engine.
"""
from __future__ import annotations

from typing import Any, Optional

MIN_TENSORRT = 10
NOT_INSTALLED = ("TensorRT is not installed (no importable `tensorrt` module; install TensorRT 10+ with its "
                 "Python bindings for your CUDA version, and a CUDA GPU is needed)")


def import_tensorrt() -> Any:
    import tensorrt  # optional dependency

    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime bindings (``cuda.bindings.runtime``; older releases: ``cuda.cudart``)."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        from cuda import cudart

        return cudart


def available() -> Optional[str]:
    """Why engines cannot be built or run on this machine, or None."""
    try:
        trt = import_tensorrt()
        version = str(trt.__version__)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a placeholder/broken install failing at import
        first = str(exc).splitlines()[0] if str(exc) else ""
        detail = "" if isinstance(exc, ImportError) else f" ({type(exc).__name__}: {first})"
        return NOT_INSTALLED + detail
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT:
        return f"TensorRT {version} is too old: strongly typed builds need TensorRT {MIN_TENSORRT}+"
    try:
        cudart = import_cudart()
    except ImportError:
        return "cuda-python is not installed (pip install cuda-python) and it is needed for engine buffers"
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # noqa: BLE001 - cuda-python raises its own errors
        return f"no CUDA GPU (cudaGetDeviceCount raised {type(exc).__name__})"
    if int(err) != 0 or int(count) < 1:
        return f"no CUDA GPU ({getattr(err, 'name', err)})" if int(err) != 0 else "no CUDA GPU"
    return None


def cuda_result(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple; raise RuntimeError naming the call on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise RuntimeError(f"{what} failed: {name}")
    return values[0] if len(values) == 1 else tuple(values)


def _version(v: int) -> str:
    """CUDA's 1000*major + 10*minor encoding -> 'major.minor'."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def engine_env(trt: Any = None, cudart: Any = None, device: int = 0) -> dict[str, Any]:
    """The environment an engine built (or run) here is tied to; raises if TensorRT or the GPU is missing."""
    trt = trt or import_tensorrt()
    cudart = cudart or import_cudart()
    prop = cuda_result(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {
        "tensorrt": str(trt.__version__),
        "gpu": str(name).strip(),
        "compute_capability": f"{int(prop.major)}.{int(prop.minor)}",
        "cuda_runtime": _version(int(cuda_result(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))),
        "cuda_driver": _version(int(cuda_result(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion"))),
    }


def _describe(env: dict[str, Any]) -> str:
    return (f"TensorRT {env.get('tensorrt', '?')} on {env.get('gpu', '?')} "
            f"(compute capability {env.get('compute_capability', '?')})")


def engine_env_mismatch(recorded: dict[str, Any], current: Optional[dict[str, Any]] = None) -> Optional[str]:
    """Why an engine recorded with ``recorded`` (a tensorrt.engine lock record, or its ``environment``) cannot
    be checked or used here, or None when this machine matches. ``current`` defaults to this machine."""
    env: Any = {}
    if isinstance(recorded, dict):
        env = recorded.get("environment", recorded.get("env", recorded))
    if not env or "tensorrt" not in env:
        return "the lock records no TensorRT environment for this engine; rebuild it"
    if current is None:
        why = available()
        if why:
            return f"the engine was built with {_describe(env)}; this machine cannot check it: {why}"
        try:
            current = engine_env()
        except Exception as exc:  # noqa: BLE001 - a broken CUDA setup is reported, not raised
            return f"the engine was built with {_describe(env)}; this machine's CUDA setup fails: {exc}"
    diffs = []
    if str(env.get("tensorrt")) != str(current.get("tensorrt")):
        diffs.append(f"TensorRT {env.get('tensorrt')} vs {current.get('tensorrt')} here")
    if str(env.get("compute_capability")) != str(current.get("compute_capability")):
        diffs.append(f"compute capability {env.get('compute_capability')} vs {current.get('compute_capability')} here")
    if str(env.get("gpu")) != str(current.get("gpu")):
        diffs.append(f"GPU {env.get('gpu')} vs {current.get('gpu')} here")
    if not diffs:
        return None
    return (f"the engine was built with {_describe(env)}, this machine has {_describe(current)} "
            f"({'; '.join(diffs)}): engines are specific to the TensorRT version and GPU, so its bytes cannot "
            "be compared here; rebuild the engine on this machine (reidbuild apply) or verify on the recorded one")
