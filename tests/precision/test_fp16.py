from __future__ import annotations

import numpy as np
import onnx

from reidbuild.compare import compare
from reidbuild.precision.fp16 import convert_fp16
from reidbuild.precision.profiles import default_tolerance

from .common import ort_features


def _types(model: onnx.ModelProto) -> dict[str, int]:
    out = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)
           + list(model.graph.output)}
    out.update({i.name: i.data_type for i in model.graph.initializer})
    return out


def test_fp16_passes_its_parity_profile_on_onnxruntime(demo):
    data, record = convert_fp16(demo.onnx)
    result = compare(demo.reference, ort_features(data, demo.parity_images), default_tolerance("onnx_fp16"))
    assert result.passed, result.failures
    assert result.min_cosine > 0.9999  # measured 0.999999
    assert record["fp16_nodes"] > 30 and record["fp32_nodes"] >= 5
    assert record["repaired_outputs"] == 1  # the converter's fp16 output cast was undone


def test_fp16_graph_keeps_float32_io_normalisation_and_head(demo):
    data, _ = convert_fp16(demo.onnx)
    model = onnx.load_from_string(data)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [f32]
    types = _types(model)
    by_op = {}
    for n in model.graph.node:
        by_op.setdefault(n.op_type, []).append(n)
    # input normalisation and the BN neck compute in float32 ...
    for op in ("Sub", "Div", "BatchNormalization", "GlobalAveragePool"):
        for n in by_op[op]:
            assert all(types.get(t, f32) == f32 for t in n.input if t), (op, n.name)
    # ... the convolutions in float16
    convs = by_op["Conv"]
    assert convs and all(types[n.input[1]] == f16 for n in convs)
    # pixel_mean / pixel_std are not rounded to fp16 (the exporter writes them as Constant nodes)
    mean = demo.model.pixel_mean.numpy().ravel()
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    sub = by_op["Sub"][0]
    assert np.array_equal(inits[sub.input[1]].ravel(), mean)


def test_fp16_bytes_are_identical_run_to_run(demo):
    a, _ = convert_fp16(demo.onnx)
    b, _ = convert_fp16(demo.onnx)
    assert a == b
