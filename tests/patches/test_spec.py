"""Patch file validation: file:line:col errors, per-format ops, declared side effects, transforms."""
from __future__ import annotations

import numpy as np
import pytest

from reidbuild.errors import PatchError
from reidbuild.patches import (adapt_input, apply_output_transform, input_layout, load_patch, load_patches,
                               output_transforms)
from tests.patches.util import write_patch


def err(tmp_path, text: str) -> str:
    p = write_patch(tmp_path, "p.yml", text)
    with pytest.raises(PatchError) as e:
        load_patch(p)
    assert e.value.exit_code == 2
    return str(e.value)


def test_valid_patch_loads(tmp_path):
    p = write_patch(tmp_path, "p.yml", """\
        format: caffe
        description: name the feature blob "feat"
        ops:
          - op: rename_tensor
            select: {last: true}
            to: feat
        """)
    lp = load_patch(p)
    assert lp.format == "caffe" and lp.model.ops[0].to == "feat" and len(lp.sha256) == 64


def test_unknown_op_suggests_the_closest(tmp_path):
    msg = err(tmp_path, """\
        format: onnx
        ops:
          - op: rename_tensr
            tensor: a
            to: b
        """)
    assert "p.yml:3:5: ops.0.op: unknown op 'rename_tensr' (did you mean 'rename_tensor'?)" in msg


def test_pydantic_errors_point_at_the_line(tmp_path):
    msg = err(tmp_path, """\
        format: onnx
        ops:
          - op: rename_node
            select: {type: Conv}
        """)
    assert "p.yml:3:5: ops.0.to: required key is missing" in msg
    msg = err(tmp_path, """\
        format: onnx
        ops:
          - op: set_batch
            size: -3
        """)
    assert "p.yml:4:" in msg and "ops.0.size" in msg
    msg = err(tmp_path, """\
        format: onnx
        ops:
          - op: remove_node
            select: {type: Conv, nmae: x}
        """)
    assert "p.yml:4:" in msg and "unknown key" in msg
    msg = err(tmp_path, """\
        format: onnx
        ops:
          - op: remove_node
            select: {regex: "(unclosed"}
        """)
    assert "invalid regex" in msg
    msg = err(tmp_path, """\
        format: onnx
        ops:
          - op: remove_node
            select: {}
        """)
    assert "select needs at least one of" in msg


def test_format_and_changes_are_validated(tmp_path):
    assert "format: got 'tflite'" in err(tmp_path, "format: tflite\nops: [{op: strip_metadata}]\n")
    msg = err(tmp_path, "format: onnx\nchanges_output: softmax\nops: [{op: strip_metadata}]\n")
    assert "changes_output" in msg and "l2_normalize" in msg
    assert "ops" in err(tmp_path, "format: onnx\nops: []\n")


def test_ops_are_checked_against_the_format(tmp_path):
    msg = err(tmp_path, "format: caffe\nops:\n  - op: set_batch\n    size: 4\n")
    assert "p.yml:3:5: ops.0.op: set_batch is for ONNX graphs only" in msg
    msg = err(tmp_path, "format: onnx\nops:\n  - {op: convert_pooling_rounding, to: bvlc}\n")
    assert "for Caffe graphs only" in msg
    msg = err(tmp_path, "format: onnx\nops:\n  - op: insert_after\n    select: {type: Relu}\n"
                        "    node: {type: Relu, name: r, params: {a: 1}}\n")
    assert "ops.0.node.params: a onnx node takes attributes" in msg
    msg = err(tmp_path, "format: caffe\nchanges_input: uint8_bgr_nhwc\nops: [{op: rename_node, select: {type: A}, to: b}]\n")
    assert "only ONNX patches can change it" in msg


def test_numeric_changes_must_be_declared(tmp_path):
    msg = err(tmp_path, "format: onnx\nops:\n  - op: l2_normalize_output\n")
    assert "declare 'changes_output: l2_normalize'" in msg and "p.yml:3:5" in msg
    msg = err(tmp_path, "format: onnx\nops:\n  - op: uint8_bgr_input\n")
    assert "declare 'changes_input: uint8_bgr_nhwc'" in msg


def test_yaml_safety_and_shape(tmp_path):
    assert "duplicate key 'format'" in err(tmp_path, "format: onnx\nformat: caffe\nops: []\n")
    assert "must be a mapping" in err(tmp_path, "- a\n- b\n")
    missing = tmp_path / "nope.yml"
    with pytest.raises(PatchError, match="patch file not found"):
        load_patch(missing)


def test_a_patch_listed_under_the_other_format(tmp_path):
    p = write_patch(tmp_path, "p.yml", "format: caffe\nops: [{op: rename_node, select: {type: A}, to: b}]\n")
    with pytest.raises(PatchError, match=r"p\.yml:1:1: format: this patch is for caffe graphs but is listed under "
                                         r"targets\.onnx\.patches"):
        load_patches([p], "onnx")


def test_output_transforms_and_input_layout(tmp_path):
    a = write_patch(tmp_path, "a.yml", "format: onnx\nchanges_output: l2_normalize\nops: [{op: l2_normalize_output}]\n")
    b = write_patch(tmp_path, "b.yml", "format: onnx\nchanges_input: uint8_bgr_nhwc\nops: [{op: uint8_bgr_input}]\n")
    c = write_patch(tmp_path, "c.yml", "format: onnx\nops: [{op: strip_metadata}]\n")
    assert output_transforms([a, b, c]) == ["l2_normalize"]
    assert output_transforms([c]) == []
    assert input_layout([a, c]) == "float32_nchw"
    assert input_layout([a, b, c]) == "uint8_bgr_nhwc"
    f = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(apply_output_transform("l2_normalize", f), [[0.6, 0.8], [0.0, 0.0]])
    with pytest.raises(ValueError):
        apply_output_transform("softmax", f)
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(adapt_input("float32_nchw", x), x)
    u = adapt_input("uint8_bgr_nhwc", x)
    assert u.shape == (2, 2, 2, 3) and u.dtype == np.uint8
    np.testing.assert_array_equal(u[1, 0, 1], x[1, ::-1, 0, 1])
    np.testing.assert_array_equal(adapt_input("uint8_bgr_nhwc", x, color="BGR")[1, 0, 1], x[1, :, 0, 1])
