"""Converter contract: refusals name the layer/op/dialect, bytes are deterministic, input/output are named."""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from onnx import TensorProto, helper
from torch import nn

from reidbuild.caffe import schema as S
from reidbuild.caffe.convert import convert, convert_detailed
from reidbuild.errors import NotExpressible, StageFailed
from tests.caffe._util import DIALECTS, export, need, rand, run_caffe, torch_ref, write_caffe


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _refusal(fn, shape=(1, 4, 6, 4), dialect="bvlc") -> str:
    with pytest.raises(NotExpressible) as info:
        convert(export(Lambda(fn), shape), dialect, shape)
    return str(info.value)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_exotic_op_is_not_expressible_with_a_clear_message(dialect):
    msg = _refusal(torch.erf, dialect=dialect)
    assert re.fullmatch(rf"layer \S+ of op Erf is not expressible in Caffe dialect {dialect}: .+", msg), msg


@pytest.mark.parametrize("fn,op,why", [
    (lambda x: x.permute(0, 2, 3, 1), "Transpose", "moves data"),
    (lambda x: torch.matmul(x.flatten(2), x.reshape(x.shape[0], -1, 4)), "MatMul", "two computed tensors"),
    (lambda x: nn.functional.avg_pool2d(x, 3, 2, 1, count_include_pad=False), "AveragePool", "count_include_pad"),
    (lambda x: nn.functional.max_pool2d(x, 3, 2, 1, dilation=2), "MaxPool", "dilated"),
    (lambda x: x[:, :, ::2], "Slice", "strided"),
    (lambda x: x.sum(dim=0, keepdim=True), "ReduceSum", "batch axis"),
], ids=["permute", "batched-matmul", "avgpool-exclude-pad", "dilated-pool", "strided-slice", "batch-reduce"])
def test_unfaithful_constructs_are_refused_not_approximated(fn, op, why):
    msg = _refusal(fn)
    assert f" of op {op} is not expressible in Caffe dialect bvlc: " in msg and why in msg, msg


def test_refused_is_a_stage_failure():
    assert issubclass(NotExpressible, StageFailed)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_output_is_deterministic_and_names_input_and_output(dialect):
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Flatten(),
                           nn.Linear(4 * 4 * 3, 6)).eval()
    model = export(module, (1, 3, 7, 5))
    a = convert(model, dialect, (3, 3, 7, 5))
    b = convert(export(module, (1, 3, 7, 5)), dialect, (3, 3, 7, 5))
    assert a == b
    net = S.parse_prototxt(a[0], dialect)
    first, last = net.layer[0], [la for la in net.layer if la.type != "Silence"][-1]
    assert (first.type, list(first.top), list(first.input_param.shape[0].dim)) == ("Input", ["input"], [3, 3, 7, 5])
    assert list(last.top) == ["output"] and last.name == "output"
    names = [la.name for la in net.layer]
    assert len(names) == len(set(names))
    # the weights file has a layer (by name) for every layer with parameters
    weights = S.parse_caffemodel(a[1], dialect)
    assert {la.name for la in weights.layer} == {la.name for la in net.layer
                                                 if la.type in ("Convolution", "InnerProduct")}


def test_conversion_facts():
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten()).eval()
    c = convert_detailed(export(module, (1, 3, 8, 4)), "ceil_mode", (2, 3, 8, 4))
    assert c.output_shape == (2, 4) and c.input_shape == (2, 3, 8, 4)
    assert c.layer_types == {"BatchNorm": 1, "Convolution": 1, "Flatten": 1, "Input": 1, "Pooling": 1,
                             "ReLU": 1, "Scale": 1}
    assert c.layer_count == 7


def test_input_shape_must_fit_the_onnx():
    model = export(nn.Conv2d(3, 4, 3), (1, 3, 8, 4), dynamic_batch=False)
    with pytest.raises(StageFailed, match="dimension 2 differs"):
        convert(model, "bvlc", (1, 3, 16, 4))
    with pytest.raises(StageFailed, match="dimension 0 differs"):
        convert(model, "bvlc", (4, 3, 8, 4))
    with pytest.raises(StageFailed, match="unknown Caffe dialect"):
        convert(model, "master", (1, 3, 8, 4))


def test_hand_built_onnx_with_shape_chain_and_expand():
    """A dynamic-batch graph as the TorchScript exporter writes it before simplification (Shape/Gather/
    Concat feeding Reshape, Expand feeding Mul) folds to a static net."""
    need("pycaffe")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 2])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 24])
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Shape", ["input"], ["shp"]),
        helper.make_node("Expand", ["s", "shp"], ["e"]),
        helper.make_node("Mul", ["input", "e"], ["m"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["m", "target"], ["output"]),
    ]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
             helper.make_tensor("zero1", TensorProto.INT64, [1], [0]),
             helper.make_tensor("minus1", TensorProto.INT64, [1], [-1])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    import tempfile
    from pathlib import Path

    xin = rand((2, 3, 4, 2), seed=7)
    g = xin.mean(axis=(2, 3), keepdims=True)
    ref = (xin * (1 / (1 + np.exp(-g)))).reshape(2, -1)
    with tempfile.TemporaryDirectory() as d:
        proto, caffemodel, text = write_caffe(Path(d), model, "bvlc", (2, 3, 4, 2))
        out = run_caffe(proto, caffemodel, "pycaffe", xin)
    # Caffe's sigmoid and numpy's exp differ by an ulp or two: rtol/atol 1e-6
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert '"Scale"' in text and "Shape" not in text


def test_batch_larger_than_one_in_the_prototxt(tmp_path):
    need("pycaffe")
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 3)).eval()
    x = rand((4, 3, 6, 4), seed=2)
    proto, caffemodel, _ = write_caffe(tmp_path, export(module, (1, 3, 6, 4)), "bvlc", (4, 3, 6, 4))
    np.testing.assert_allclose(run_caffe(proto, caffemodel, "pycaffe", x), torch_ref(module, x),
                               rtol=1e-5, atol=1e-6)  # 3-term dot products in float32


@pytest.mark.parametrize("runtime", ["pycaffe", "opencv"])
def test_output_taken_from_a_multi_top_layer(runtime, tmp_path):
    """When "output" is one part of a Slice, it still gets a layer of its own named "output" (OpenCV reads
    a layer's first top)."""
    need(runtime)
    module = Lambda(lambda x: torch.relu(x)[:, 2:4])
    x = rand((2, 5, 3, 2), seed=8)
    proto, caffemodel, text = write_caffe(tmp_path, export(module, (1, 5, 3, 2)), "bvlc", (2, 5, 3, 2))
    net = S.parse_prototxt(text, "bvlc")
    out_layer = next(la for la in net.layer if "output" in la.top)
    assert out_layer.name == "output" and list(out_layer.top) == ["output"]
    np.testing.assert_array_equal(run_caffe(proto, caffemodel, runtime, x), torch_ref(module, x).reshape(2, -1))


def test_prototxt_parses_with_its_own_dialect_schema():
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.Flatten()).eval()
    model = export(module, (1, 3, 8, 6))  # 3x3/2 pad 1: floor gives 4x3, ceil 5x4
    texts = {d: convert(model, d, (1, 3, 8, 6))[0] for d in DIALECTS}
    for d, text in texts.items():
        assert S.net_to_text(S.parse_prototxt(text, d)) == text
    with pytest.raises(text_format.ParseError, match="ceil_mode"):
        S.parse_prototxt(texts["ceil_mode"], "bvlc")
    assert '"Slice"' in texts["bvlc"] and '"Slice"' not in texts["ceil_mode"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_streamed_caffemodel_is_the_whole_message_serialized(dialect, tmp_path):
    """The .caffemodel written layer by layer (to hold one copy of the weights, not two) has exactly the bytes
    of the one NetParameter message serialized deterministically; convert_file gives what convert gives."""
    from reidbuild.caffe.convert import build_net, caffemodel_bytes, convert_file, to_messages

    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    model = export(module, (1, 3, 8, 4))
    net = build_net(model, dialect, (1, 3, 8, 4))
    _, weights = to_messages(net, dialect, "m")
    whole = S.net_to_binary(weights)
    assert len(weights.layer) == 3 and caffemodel_bytes(net, dialect, "m") == whole
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    c = convert_file(path, dialect, (1, 3, 8, 4), name="m")
    assert (c.prototxt, c.caffemodel) == convert(model, dialect, (1, 3, 8, 4), name="m")
    assert c.caffemodel == whole
    path.write_bytes(b"not an onnx model")
    with pytest.raises(StageFailed, match="m.onnx: not a readable ONNX model"):
        convert_file(path, dialect, (1, 3, 8, 4))
