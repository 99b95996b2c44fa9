"""Real TensorRT engines (fp32, fp16, int8) built from reidbuild's ONNX, checked against PyTorch with the
parity profiles. Skipped with the reason where TensorRT or a GPU is missing."""
from __future__ import annotations

import pytest

from reidbuild.tensorrt.env import available

why = available()
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")

BATCH = 8


@pytest.fixture(scope="module")
def engines(demo_gpu):
    from reidbuild.tensorrt.build import EngineSettings, build_engine

    out = {}
    for mode, data in demo_gpu["onnx"].items():
        out[mode] = build_engine(data, EngineSettings(batch_size=BATCH, workspace_mib=1024), log=print)
    return out


@pytest.mark.parametrize("mode", ["fp32", "fp16", "int8"])
def test_engine_passes_its_parity_profile(demo_gpu, engines, mode):
    from reidbuild.backends.tensorrt import TensorRTRunner
    from reidbuild.compare import compare
    from reidbuild.precision.profiles import default_tolerance
    from tests.precision.common import ort_features

    with TensorRTRunner(engines[mode].engine) as runner:
        feats = runner.infer(demo_gpu["x"])  # 12 images > max batch 8: chunked
    result = compare(demo_gpu["reference"], feats, default_tolerance("tensorrt" if mode == "fp32" else f"tensorrt_{mode}"))
    print(mode, "vs torch:", result.summary())
    # the engine computes what onnxruntime computed from the same ONNX (numerics live in the graph)
    same_graph = compare(ort_features(demo_gpu["onnx"][mode], demo_gpu["x"]), feats, {"min_cosine": 0.999})
    print(mode, "vs onnxruntime on the same ONNX:", same_graph.summary())
    assert result.passed, result.failures
    assert same_graph.passed, same_graph.failures


def test_record_env_and_timing_cache_reuse(demo_gpu, engines):
    from reidbuild.tensorrt.build import EngineSettings, build_engine
    from reidbuild.tensorrt.env import engine_env, engine_env_mismatch

    rec = engines["fp16"].record
    assert rec["environment"] == engine_env() and engine_env_mismatch(rec) is None
    assert rec["inputs"][0]["profile"]["max"][0] == BATCH
    again = build_engine(demo_gpu["onnx"]["fp16"], EngineSettings(batch_size=BATCH),
                         timing_cache=engines["fp16"].timing_cache)
    assert again.record["timing_cache"] == "reused"
    other = dict(rec["environment"], tensorrt="0.0.0")
    assert "TensorRT 0.0.0 vs" in engine_env_mismatch({"environment": other})
