"""Engine build and engine runner against a RECORDING STAND-IN of the ``tensorrt`` module.

The stand-in (tests/precision/trt_standin.py) is not TensorRT: it builds nothing and runs nothing. These tests
check that reidbuild maps the manifest to the right TensorRT and cuda-python calls; they do NOT count as
engine verification (that is tests/gpu, run by scripts/gpu_check.sh where TensorRT and a GPU exist).
"""
from __future__ import annotations

import numpy as np
import pytest

from reidbuild.errors import NotExpressible, StageFailed
from reidbuild.tensorrt.build import EngineSettings, build_engine
from reidbuild.tensorrt.env import engine_env, engine_env_mismatch

from .trt_standin import HostCudart, RunnerTensorRT, StandInTensorRT

ENV = {"tensorrt": "11.4.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
       "cuda_runtime": "13.0", "cuda_driver": "13.0"}


def test_manifest_maps_to_a_strongly_typed_build_with_profile_workspace_and_timing_cache():
    trt = StandInTensorRT(input_shape=(-1, 3, 256, 128))
    built = build_engine(b"ONNX", EngineSettings(batch_size=8, workspace_mib=512), timing_cache=None, trt=trt,
                         env=ENV)
    c = trt.calls
    assert ("create_network", 1 << 1) in c  # 1 << int(STRONGLY_TYPED) (the stand-in's enum value is 1)
    assert ("parse", 4) in c
    assert ("set_memory_pool_limit", "WORKSPACE", 512 << 20) in c
    assert ("set_shape", "input", [1, 3, 256, 128], [8, 3, 256, 128], [8, 3, 256, 128]) in c
    assert ("add_optimization_profile",) in c
    assert ("create_timing_cache", b"") in c and ("set_timing_cache", b"", False) in c
    assert ("clear_flag", "TF32") in c
    assert not [x for x in c if x[0] == "set_flag"]  # no precision flags: the ONNX decides the types
    assert trt.names().index("set_timing_cache") < trt.names().index("build_serialized_network")
    assert built.engine == b"ENGINE" and built.timing_cache == b"CACHE:"
    r = built.record
    assert r["environment"] == ENV and r["timing_cache"] == "fresh" and r["tf32"] is False and r["workspace_mib"] == 512
    assert r["inputs"][0]["profile"] == {"min": [1, 3, 256, 128], "opt": [8, 3, 256, 128], "max": [8, 3, 256, 128]}


def test_previous_timing_cache_is_reused_or_replaced_when_it_does_not_fit():
    trt = StandInTensorRT()
    built = build_engine(b"ONNX", EngineSettings(batch_size=4), timing_cache=b"OLD", trt=trt, env=ENV)
    assert ("set_timing_cache", b"OLD", False) in trt.calls and built.record["timing_cache"] == "reused"
    assert built.timing_cache == b"CACHE:OLD"
    trt = StandInTensorRT(cache_mismatch=True)
    logs: list[str] = []
    built = build_engine(b"ONNX", EngineSettings(batch_size=4), timing_cache=b"OLD", trt=trt, env=ENV,
                         log=logs.append)
    assert built.record["timing_cache"] == "mismatch: replaced" and any("timing cache" in m for m in logs)


def test_static_batch_needs_no_profile_and_must_match_batch_size():
    trt = StandInTensorRT(input_shape=(1, 3, 64, 32))
    build_engine(b"ONNX", EngineSettings(batch_size=1), trt=trt, env=ENV)
    assert "set_shape" not in trt.names() and "add_optimization_profile" not in trt.names()
    with pytest.raises(NotExpressible, match="static batch of 1"):
        build_engine(b"ONNX", EngineSettings(batch_size=8), trt=StandInTensorRT(input_shape=(1, 3, 64, 32)), env=ENV)


def test_dynamic_spatial_dims_take_the_manifest_size():
    trt = StandInTensorRT(input_shape=(-1, 3, -1, -1))
    build_engine(b"ONNX", EngineSettings(batch_size=2, height=256, width=128), trt=trt, env=ENV)
    assert ("set_shape", "input", [1, 3, 256, 128], [2, 3, 256, 128], [2, 3, 256, 128]) in trt.calls
    with pytest.raises(NotExpressible, match="height/width"):
        build_engine(b"ONNX", EngineSettings(batch_size=2), trt=StandInTensorRT(input_shape=(-1, 3, -1, -1)), env=ENV)


def test_every_parse_error_is_listed_and_fatal():
    trt = StandInTensorRT(parse_errors=[(3, "/heads/Gather", "Gather", "unsupported axis"),
                                        (7, "/Foo", "Foo", "no importer registered for op: Foo")])
    with pytest.raises(StageFailed) as err:
        build_engine(b"ONNX", EngineSettings(batch_size=1), trt=trt, env=ENV)
    msg = str(err.value)
    assert "2 error(s)" in msg and "node 3 /heads/Gather (Gather): unsupported axis" in msg
    assert "node 7 /Foo (Foo): no importer registered for op: Foo" in msg
    assert "build_serialized_network" not in trt.names()


def test_a_failed_build_is_a_stage_failure():
    with pytest.raises(StageFailed, match="could not build the engine"):
        build_engine(b"ONNX", EngineSettings(batch_size=1), trt=StandInTensorRT(build_fails=True), env=ENV)


def test_runner_chunks_above_the_profile_max_and_uses_cuda_python_buffers():
    from reidbuild.backends.tensorrt import TensorRTRunner

    trt, cudart = RunnerTensorRT(item_shape=(3, 8, 4), out_dim=16, max_batch=4), HostCudart()
    runner = TensorRTRunner(b"PLAN", trt=trt, cudart=cudart)
    x = np.random.default_rng(0).uniform(0, 255, (10, 3, 8, 4)).astype(np.float32)
    out = runner.infer(x)
    np.testing.assert_array_equal(out, x.reshape(10, -1)[:, :16])
    shapes = [c[2][0] for c in trt.calls if c[0] == "set_input_shape"]
    assert shapes == [4, 4, 4, 2]  # allocation at max batch, then chunks 4 + 4 + 2
    assert [c[1] for c in trt.calls if c[0] == "execute_async_v3"] == [4, 4, 2]
    kinds = [c[1] for c in cudart.calls if c[0] == "cudaMemcpyAsync"]
    assert kinds == ["cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost"] * 3
    assert sum(1 for c in cudart.calls if c[0] == "cudaStreamSynchronize") == 3
    assert runner.describe()["environment"]["gpu"] == "Stand-in GPU" and runner.max_batch == 4
    runner.close()
    assert sum(1 for c in cudart.calls if c[0] == "cudaFree") == 2 and not cudart.live
    with pytest.raises(StageFailed, match="cannot deserialize"):
        TensorRTRunner(b"BROKEN", trt=trt, cudart=HostCudart())


def test_runner_is_a_context_manager_that_releases_buffers_stream_and_engine():
    from reidbuild.backends.tensorrt import TensorRTRunner

    trt, cudart = RunnerTensorRT(item_shape=(3, 8, 4), out_dim=16, max_batch=4), HostCudart()
    x = np.random.default_rng(1).uniform(0, 255, (3, 3, 8, 4)).astype(np.float32)
    with TensorRTRunner(b"PLAN", trt=trt, cudart=cudart) as runner:
        np.testing.assert_array_equal(runner.infer(x), x.reshape(3, -1)[:, :16])
        assert cudart.live
    assert not cudart.live and runner.engine is None and runner.context is None and runner.stream is None
    runner.close()  # twice is harmless
    assert sum(1 for c in cudart.calls if c[0] == "cudaFree") == 2


def test_engine_env_reads_cuda_python():
    env = engine_env(StandInTensorRT(), HostCudart())
    assert env == {"tensorrt": "11.4.0.standin", "gpu": "Stand-in GPU", "compute_capability": "9.0",
                   "cuda_runtime": "12.8", "cuda_driver": "13.0"}


def test_engine_env_mismatch_names_what_differs():
    assert engine_env_mismatch({"environment": ENV}, current=dict(ENV, cuda_driver="13.1")) is None
    msg = engine_env_mismatch({"environment": ENV}, current=dict(ENV, tensorrt="10.13.0", gpu="NVIDIA A100-SXM4-80GB",
                                                         compute_capability="8.0"))
    assert "TensorRT 11.4.0 vs 10.13.0 here" in msg and "compute capability 9.0 vs 8.0 here" in msg
    assert "NVIDIA A100" in msg and "rebuild the engine" in msg
    assert "no TensorRT environment" in engine_env_mismatch({})
    # verify.py passes the record or its environment
    assert engine_env_mismatch({"mode": "fp16", "environment": ENV}, current=ENV) is None


def test_engine_env_mismatch_on_a_machine_without_tensorrt(monkeypatch):
    import reidbuild.tensorrt.env as trt_env

    monkeypatch.setattr(trt_env, "available", lambda: "no CUDA GPU")
    msg = engine_env_mismatch({"environment": ENV})
    assert "built with TensorRT 11.4.0 on NVIDIA H100 80GB HBM3 (compute capability 9.0)" in msg
    assert msg.endswith("no CUDA GPU")
