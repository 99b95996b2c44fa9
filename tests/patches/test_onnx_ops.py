"""Every ONNX op on a tiny torch-exported model: effect on the graph, numerics, and the errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from reidbuild.errors import PatchError, StageFailed
from reidbuild.patches import (adapt_input, apply_onnx, apply_output_transform, diff_patches, input_layout,
                               load_patches, output_transforms)
from tests.patches.util import INPUT, images, run_onnx, write_patch


def patch(tmp_path: Path, onnx_bytes: bytes, text: str, name: str = "p.yml", check: bool = True):
    p = write_patch(tmp_path, name, text)
    out, records = apply_onnx(onnx_bytes, load_patches([p], "onnx"), input_shape=INPUT, what="m.onnx",
                              check=check)
    return onnx.load_from_string(out), out, records


def op_types(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_rename_tensor_by_selector_renames_the_graph_output(tmp_path, onnx_bytes):
    m, data, rec = patch(tmp_path, onnx_bytes, """\
        format: onnx
        ops:
          - {op: rename_tensor, select: {last: true}, to: feat}
        """)
    assert [o.name for o in m.graph.output] == ["feat"]
    assert m.graph.node[-1].output[0] == "feat"
    assert rec[0]["ops"] == [{"op": "rename_tensor", "matched": 1}]
    x = images()
    np.testing.assert_array_equal(run_onnx(data, x), run_onnx(onnx_bytes, x))


def test_rename_tensor_by_name_follows_every_reference(tmp_path, onnx_bytes):
    m, data, _ = patch(tmp_path, onnx_bytes, """\
        format: onnx
        ops:
          - {op: rename_tensor, tensor: input, to: images}
          - {op: rename_tensor, tensor: fc.weight, to: head_weight}
        """)
    assert [i.name for i in m.graph.input] == ["images"]
    assert "head_weight" in {t.name for t in m.graph.initializer}
    assert any("head_weight" in n.input for n in m.graph.node)
    assert not any("input" in n.input for n in m.graph.node)


def test_rename_tensor_refuses_a_name_in_use(tmp_path, onnx_bytes):
    with pytest.raises(PatchError, match=r"ops\[0\] \(rename_tensor\).*'input' is already used"):
        patch(tmp_path, onnx_bytes, """\
            format: onnx
            ops:
              - {op: rename_tensor, select: {last: true}, to: input}
            """)


def test_rename_node(tmp_path, onnx_bytes):
    m, _, _ = patch(tmp_path, onnx_bytes, """\
        format: onnx
        ops:
          - {op: rename_node, select: {type: Gemm}, to: head}
          - {op: rename_node, select: {regex: "/conv/.*"}, to: stem}
        """)
    names = [n.name for n in m.graph.node]
    assert "head" in names and "stem" in names


def test_remove_node_rewires_consumers(tmp_path, onnx_bytes):
    m, data, rec = patch(tmp_path, onnx_bytes, """\
        format: onnx
        ops:
          - op: insert_after
            select: {type: Relu}
            node: {type: Identity, name: extra}
          - {op: remove_node, select: {type: Identity}}
        """)
    assert "Identity" not in op_types(m)
    assert [r["matched"] for r in rec[0]["ops"]] == [1, 1]
    x = images()
    np.testing.assert_array_equal(run_onnx(data, x), run_onnx(onnx_bytes, x))


def test_remove_node_of_the_output_keeps_the_output_name(tmp_path, onnx_bytes):
    m, _, _ = patch(tmp_path, onnx_bytes, """\
        format: onnx
        ops:
          - op: insert_after
            select: {last: true}
            node: {type: Identity, name: tail}
          - {op: remove_node, select: {name: tail}}
        """)
    # insert_after moved the graph output to "tail"; removing that node keeps the name "tail"
    assert [o.name for o in m.graph.output] == ["tail"]
    assert m.graph.node[-1].op_type == "Gemm" and list(m.graph.node[-1].output) == ["tail"]
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_remove_node_needs_one_data_input(tmp_path, onnx_bytes):
    model = onnx.load_from_string(onnx_bytes)
    div = next(n for n in model.graph.node if n.op_type == "Div")
    div.input[1] = "input"  # x / x: two data inputs (a Constant/initializer input would not count)
    with pytest.raises(PatchError, match="2 data inputs"):
        patch(tmp_path, model.SerializeToString(), """\
            format: onnx
            ops:
              - {op: remove_node, select: {type: Div}}
            """)


def test_a_patch_that_breaks_the_graph_fails_the_stage(tmp_path, onnx_bytes):
    # without the Flatten, Gemm gets a 4-D tensor: shape inference / onnxruntime refuse it
    with pytest.raises(StageFailed, match=r"patch .*p\.yml broke the graph: m\.onnx: .*"):
        patch(tmp_path, onnx_bytes, """\
            format: onnx
            ops:
              - {op: remove_node, select: {type: Flatten}}
            """)


def test_set_and_remove_field(tmp_path, onnx_bytes):
    m, data, _ = patch(tmp_path, onnx_bytes, """\
        format: onnx
        ops:
          - {op: set_field, select: {type: MaxPool}, field: ceil_mode, value: 1}
          - {op: set_field, select: {type: Gemm}, field: alpha, value: 2}
        """)
    mp = next(n for n in m.graph.node if n.op_type == "MaxPool")
    assert onnx.helper.get_attribute_value(next(a for a in mp.attribute if a.name == "ceil_mode")) == 1
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    alpha = next(a for a in gemm.attribute if a.name == "alpha")
    assert alpha.type == onnx.AttributeProto.FLOAT and alpha.f == 2.0  # coerced to the existing type
    m2, _, rec = patch(tmp_path, data, """\
        format: onnx
        ops:
          - {op: remove_field, select: {type: MaxPool}, field: ceil_mode}
        """, name="q.yml")
    mp = next(n for n in m2.graph.node if n.op_type == "MaxPool")
    assert "ceil_mode" not in [a.name for a in mp.attribute]
    assert rec[0]["ops"][0]["matched"] == 1


def test_remove_field_that_no_node_has_is_a_no_match(tmp_path, onnx_bytes):
    with pytest.raises(PatchError, match="matched 1 node.*none has attribute 'nope'"):
        patch(tmp_path, onnx_bytes, """\
            format: onnx
            ops:
              - {op: remove_field, select: {type: MaxPool}, field: nope}
            """)


def test_insert_after_and_before(tmp_path, onnx_bytes):
    m, data, _ = patch(tmp_path, onnx_bytes, """\
        format: onnx
        ops:
          - op: insert_before
            select: {type: Gemm}
            node: {type: Relu, name: pre_head_relu}
          - op: insert_after
            select: {last: true}
            node: {type: Softmax, name: probs, attributes: {axis: -1}}
        """)
    types = op_types(m)
    assert types[-3:] == ["Relu", "Gemm", "Softmax"]
    assert [o.name for o in m.graph.output] == ["probs"]  # the graph output moved to the new node
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out = run_onnx(data, images())
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_set_batch_fixed_and_dynamic(tmp_path, onnx_bytes, onnx_fixed_bytes):
    m, data, rec = patch(tmp_path, onnx_bytes, """\
        format: onnx
        ops:
          - {op: set_batch, size: 8}
        """)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 8
    assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 8
    assert run_onnx(data, images(8)).shape == (8, 4)
    m, data, _ = patch(tmp_path, onnx_fixed_bytes, """\
        format: onnx
        ops:
          - {op: set_batch, size: dynamic, dim_param: N}
        """, name="q.yml")
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert run_onnx(data, images(5)).shape == (5, 4)


def test_set_batch_check_runs_two_batch_sizes(tmp_path, onnx_fixed_bytes):
    """A batch of 1 baked into a Reshape breaks a dynamic batch: the check catches it."""
    model = onnx.load_from_string(onnx_fixed_bytes)
    flat = next(n for n in model.graph.node if n.op_type == "Flatten")
    shape = onnx.numpy_helper.from_array(np.array([1, 8], dtype=np.int64), "baked_shape")
    model.graph.initializer.append(shape)
    flat.op_type = "Reshape"
    del flat.attribute[:]
    flat.input.append("baked_shape")
    with pytest.raises(StageFailed, match="batch 2"):
        patch(tmp_path, model.SerializeToString(), """\
            format: onnx
            ops:
              - {op: set_batch, size: dynamic}
            """)


def test_l2_normalize_output_matches_the_declared_transform(tmp_path, onnx_bytes):
    p = write_patch(tmp_path, "l2.yml", """\
        format: onnx
        changes_output: l2_normalize
        ops:
          - {op: l2_normalize_output}
        """)
    out, _ = apply_onnx(onnx_bytes, load_patches([p]), input_shape=INPUT, what="m.onnx")
    m = onnx.load_from_string(out)
    assert [o.name for o in m.graph.output] == ["output"]
    assert op_types(m)[-3:] == ["ReduceL2", "Max", "Div"]
    x = images(4)
    got = run_onnx(out, x)
    assert output_transforms([p]) == ["l2_normalize"]
    ref = apply_output_transform("l2_normalize", run_onnx(onnx_bytes, x))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_uint8_bgr_input_matches_the_float_rgb_model(tmp_path, onnx_bytes):
    from reidbuild.backends.inputs import graph_layout

    p = write_patch(tmp_path, "u8.yml", """\
        format: onnx
        changes_input: uint8_bgr_nhwc
        ops:
          - {op: uint8_bgr_input}
        """)
    out, _ = apply_onnx(onnx_bytes, load_patches([p]), input_shape=INPUT, what="m.onnx")
    m = onnx.load_from_string(out)
    inp = m.graph.input[0]
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 16, 8, 3]
    assert input_layout([p]) == "uint8_bgr_nhwc"
    x = images(3)
    ref = run_onnx(onnx_bytes, x)
    feed = adapt_input(input_layout([p]), x)
    assert feed.dtype == np.uint8 and feed.shape == (3, 16, 8, 3)
    np.testing.assert_array_equal(feed[0, 2, 5], x[0, ::-1, 2, 5].astype(np.uint8))  # BGR order
    np.testing.assert_array_equal(run_onnx(out, feed), ref)
    np.testing.assert_array_equal(adapt_input(graph_layout("tensor(uint8)", ["batch", 16, 8, 3]), x), feed)


def test_strip_metadata(tmp_path, onnx_bytes):
    model = onnx.load_from_string(onnx_bytes)
    onnx.helper.set_model_props(model, {"author": "someone", "path": "/home/someone/x"})
    model.graph.node[0].doc_string = "from /home/someone/model.py:12"
    m, _, rec = patch(tmp_path, model.SerializeToString(), """\
        format: onnx
        ops:
          - {op: strip_metadata, producer: true}
        """)
    assert len(m.metadata_props) == 0 and not m.graph.node[0].doc_string and not m.producer_name
    assert rec[0]["ops"][0]["matched"] >= 3


def test_no_match_names_patch_op_and_selector(tmp_path, onnx_bytes):
    with pytest.raises(PatchError) as err:
        patch(tmp_path, onnx_bytes, """\
            format: onnx
            ops:
              - {op: rename_node, select: {type: Gemm}, to: head}
              - op: remove_node
                select: {type: Dropout, regex: "drop.*"}
            """)
    msg = str(err.value)
    assert "p.yml:4:5: ops[1] (remove_node)" in msg
    assert "select {type: Dropout, regex: drop.*} matched no node" in msg and "optional: true" in msg
    assert err.value.exit_code == 2


def test_optional_op_matching_nothing_is_recorded_as_skipped(tmp_path, onnx_bytes):
    _, data, rec = patch(tmp_path, onnx_bytes, """\
        format: onnx
        ops:
          - {op: remove_node, select: {type: Dropout}, optional: true}
        """)
    assert rec[0]["ops"] == [{"op": "remove_node", "matched": 0, "skipped": True}]


def test_ambiguous_selector_for_a_single_node_op(tmp_path, onnx_bytes):
    with pytest.raises(PatchError, match=r"matched \d+ nodes .*needs exactly one"):
        patch(tmp_path, onnx_bytes, """\
            format: onnx
            ops:
              - {op: rename_node, select: {regex: ".*"}, to: x}
            """)


def test_selectors_combine(tmp_path, onnx_bytes):
    m, _, _ = patch(tmp_path, onnx_bytes, """\
        format: onnx
        ops:
          - {op: rename_node, select: {consumer_of: input}, to: scale}
          - {op: rename_node, select: {producer_of: output, type: Gemm}, to: head}
        """)
    assert m.graph.node[1].name == "scale" and m.graph.node[1].op_type == "Div"
    assert m.graph.node[-1].name == "head"


def test_patches_apply_in_order(tmp_path, onnx_bytes):
    a = write_patch(tmp_path, "a.yml", """\
        format: onnx
        ops: [{op: rename_tensor, tensor: output, to: emb}]
        """)
    b = write_patch(tmp_path, "b.yml", """\
        format: onnx
        ops: [{op: rename_tensor, tensor: emb, to: feat}]
        """)
    out, rec = apply_onnx(onnx_bytes, load_patches([a, b]), input_shape=INPUT, what="m.onnx")
    assert [o.name for o in onnx.load_from_string(out).graph.output] == ["feat"]
    assert [r["file"] for r in rec] == ["a.yml", "b.yml"] and [r["role"] for r in rec] == ["patch[0]", "patch[1]"]
    with pytest.raises(PatchError, match="b.yml.*tensor 'emb' does not exist"):
        apply_onnx(onnx_bytes, load_patches([b, a]), input_shape=INPUT, what="m.onnx")


def test_diff_lists_each_patch_change(tmp_path, onnx_file):
    a = write_patch(tmp_path, "a.yml", """\
        format: onnx
        ops: [{op: rename_tensor, select: {last: true}, to: feat}]
        """)
    b = write_patch(tmp_path, "b.yml", """\
        format: onnx
        changes_output: l2_normalize
        ops: [{op: l2_normalize_output}]
        """)
    diffs = diff_patches("onnx", [a, b], [onnx_file])
    assert [p.name for p, _ in diffs] == ["a.yml", "b.yml"]
    first, second = diffs[0][1], diffs[1][1]
    assert "-output output: float[batch,4]" in first and "+output feat: float[batch,4]" in first
    assert "(before a.yml)" in first.splitlines()[0]
    assert "+node   feat__l2norm: ReduceL2(feat__unnormalized)" in second
    assert "-output" not in second  # the output name and shape do not change
