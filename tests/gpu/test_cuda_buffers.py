"""The engine runner's cuda-python plumbing on a real GPU (cudaMalloc, async copies, stream, chunking).

Runs where a CUDA GPU and cuda-python exist, TensorRT or not: the engine is the RECORDING STAND-IN from
tests/precision/trt_standin.py, whose 'execution' is a device-to-device cudaMemcpyAsync. So this verifies
the buffers and copies, not TensorRT.
"""
from __future__ import annotations

import numpy as np
import pytest

from .common import cuda_reason

why = cuda_reason()
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")


def test_runner_moves_batches_through_real_device_memory_in_chunks():
    from reidbuild.backends.tensorrt import TensorRTRunner
    from reidbuild.tensorrt.env import import_cudart
    from tests.precision.trt_standin import RunnerTensorRT

    cudart = import_cudart()

    def d2d(dst: int, src: int, n: int, stream) -> None:
        err, = cudart.cudaMemcpyAsync(dst, src, n, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)
        assert int(err) == 0

    trt = RunnerTensorRT(item_shape=(3, 16, 8), out_dim=200, max_batch=4, copy=d2d)
    with TensorRTRunner(b"PLAN", trt=trt, cudart=cudart) as runner:
        x = np.random.default_rng(1).uniform(0, 255, (11, 3, 16, 8)).astype(np.float32)
        out = runner.infer(x)
        np.testing.assert_array_equal(out, x.reshape(11, -1)[:, :200])
        assert [c[1] for c in trt.calls if c[0] == "execute_async_v3"] == [4, 4, 3]
        env = runner.describe()["environment"]
        assert env["gpu"] and env["compute_capability"] and env["cuda_runtime"] and env["cuda_driver"]


def test_engine_env_is_read_from_the_gpu():
    from reidbuild.tensorrt.env import engine_env, import_cudart

    class _NoTensorRT:
        __version__ = "absent"

    env = engine_env(_NoTensorRT(), import_cudart())
    major, minor = env["compute_capability"].split(".")
    assert int(major) >= 3 and minor.isdigit() and env["gpu"].strip()
    print("engine_env:", env)
