"""Every Caffe op on a tiny net parsed by reidbuild's Caffe schema; numerics through real Caffe when present."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reidbuild.caffe import schema as S
from reidbuild.errors import NotExpressible, PatchError, StageFailed
from reidbuild.patches import apply_caffe, diff_patches, load_patches
from tests.patches.util import caffe_forward, caffe_net, caffe_weights, write_patch

FLOOR = "ceil_mode: false "
FC_CEIL, FC_FLOOR = 4 * 9 * 5, 4 * 8 * 4  # fc inputs: pool1 gives 9x5 rounding up, 8x4 rounding down


def patch(tmp_path: Path, text: str, *, dialect: str = "bvlc", net: str | None = None, weights: bytes | None = None,
          name: str = "p.yml"):
    p = write_patch(tmp_path, name, text)
    net = caffe_net() if net is None else net
    weights = caffe_weights(dialect, FC_CEIL) if weights is None else weights
    out_text, out_w, rec = apply_caffe(net, weights, load_patches([p], "caffe"), dialect=dialect,
                                       input_shape=(1, 3, 16, 8), what="net.prototxt")
    return S.parse_prototxt(out_text, dialect), S.parse_caffemodel(out_w, dialect), out_text, out_w, rec


def layer(net, name):
    return next(la for la in net.layer if la.name == name)


def weights_of(model, name):
    return [S.blob_array(b) for b in layer(model, name).blobs]


def test_rename_tensor_of_an_in_place_last_layer(tmp_path):
    net, _, _, _, rec = patch(tmp_path, """\
        format: caffe
        description: name the feature blob "feat", as our C++ service expects
        ops:
          - op: rename_tensor
            select: {last: true}
            to: feat
        """)
    # relu2 ran in place on "fc"; now it reads fc and writes feat (same numbers, new name)
    assert list(layer(net, "relu2").bottom) == ["fc"] and list(layer(net, "relu2").top) == ["feat"]
    assert list(layer(net, "fc").top) == ["fc"]
    assert rec[0]["ops"] == [{"op": "rename_tensor", "matched": 1}]


def test_rename_tensor_follows_in_place_layers(tmp_path):
    net, *_ = patch(tmp_path, """\
        format: caffe
        ops:
          - {op: rename_tensor, select: {name: conv1}, to: c1}
        """)
    assert list(layer(net, "conv1").top) == ["c1"]
    assert list(layer(net, "relu1").bottom) == ["c1"] and list(layer(net, "relu1").top) == ["c1"]
    assert list(layer(net, "pool1").bottom) == ["c1"]


def test_rename_tensor_by_name_renames_every_use(tmp_path):
    net, *_ = patch(tmp_path, """\
        format: caffe
        ops:
          - {op: rename_tensor, tensor: data, to: images}
          - {op: rename_tensor, tensor: fc, to: emb}
        """)
    assert list(layer(net, "data").top) == ["images"] and list(layer(net, "conv1").bottom) == ["images"]
    assert list(layer(net, "relu2").bottom) == ["emb"] and list(layer(net, "relu2").top) == ["emb"]


def test_rename_node_weights_follow(tmp_path):
    net, model, *_ = patch(tmp_path, """\
        format: caffe
        ops:
          - {op: rename_node, select: {type: InnerProduct}, to: head}
        """)
    src = S.parse_caffemodel(caffe_weights("bvlc", FC_CEIL), "bvlc")
    assert [la.name for la in model.layer] == ["conv1", "head"]
    for a, b in zip(weights_of(model, "head"), weights_of(src, "fc")):
        np.testing.assert_array_equal(a, b)


def test_remove_node_in_place_and_at_the_end(tmp_path):
    net, model, *_ = patch(tmp_path, """\
        format: caffe
        ops:
          - {op: remove_node, select: {type: ReLU, name: relu1}}
        """)
    assert "relu1" not in [la.name for la in net.layer]
    assert list(layer(net, "pool1").bottom) == ["conv1"]
    drop_net = caffe_net() + 'layer { name: "drop" type: "Dropout" bottom: "fc" top: "out" }\n'
    net, model, *_ = patch(tmp_path, """\
        format: caffe
        ops:
          - {op: remove_node, select: {type: Dropout}}
        """, net=drop_net, name="q.yml")
    # the net output keeps its name: the value Dropout read (relu2's, in place on fc) is now called "out"
    assert list(layer(net, "fc").top) == ["fc"]
    assert list(layer(net, "relu2").bottom) == ["fc"] and list(layer(net, "relu2").top) == ["out"]
    assert [la.name for la in model.layer] == ["conv1", "fc"]


def test_remove_node_with_weights_drops_them(tmp_path):
    net, model, *_ = patch(tmp_path, """\
        format: caffe
        ops:
          - {op: remove_node, select: {name: conv1}}
          - {op: remove_node, select: {name: relu1}}
        """, weights=caffe_weights("bvlc", 3 * 9 * 5))
    assert [la.name for la in model.layer] == ["fc"]
    assert list(layer(net, "pool1").bottom) == ["data"]


def test_remove_node_refuses_to_shadow_an_in_place_blob(tmp_path):
    # conv1 -> x; "copy" x -> y; relu in place on x; fc reads y. Without "copy", fc would read the ReLU'd x.
    net = """\
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
        layer { name: "conv1" type: "Convolution" bottom: "data" top: "x" convolution_param { num_output: 2 kernel_size: 1 } }
        layer { name: "copy" type: "Power" bottom: "x" top: "y" }
        layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
        layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "y" top: "z" }
        """
    with pytest.raises(PatchError, match="ops\\[0\\] \\(remove_node\\).*layer sum \\[Eltwise\\] would read blob 'x' as "
                                         "written by relu \\[ReLU\\]"):
        patch(tmp_path, "format: caffe\nops: [{op: remove_node, select: {name: copy}}]\n", net=net,
              weights=S.net_to_binary(S.new_net("bvlc")))


def test_set_and_remove_field(tmp_path):
    net, *_ = patch(tmp_path, """\
        format: caffe
        ops:
          - {op: set_field, select: {type: Pooling}, field: pooling_param.pool, value: AVE}
          - {op: set_field, select: {type: ReLU}, field: relu_param.negative_slope, value: 0.1}
          - {op: set_field, select: {name: pool1}, field: pooling_param, value: {pool: AVE, kernel_size: 3, stride: 2, pad: 1}}
        """)
    p = layer(net, "pool1").pooling_param
    assert p.pool == p.AVE and p.kernel_size == 3
    assert abs(layer(net, "relu1").relu_param.negative_slope - 0.1) < 1e-7
    net, _, _, _, rec = patch(tmp_path, """\
        format: caffe
        ops:
          - {op: remove_field, select: {type: Pooling}, field: pooling_param.pad}
        """, name="q.yml", weights=caffe_weights("bvlc", 4 * 8 * 4))
    assert not layer(net, "pool1").pooling_param.HasField("pad")
    assert rec[0]["ops"][0]["matched"] == 1


def test_field_errors(tmp_path):
    with pytest.raises(PatchError, match="none sets pooling_param.ceil_mode \\(PoolingParameter has no field "
                                         "'ceil_mode' in the bvlc dialect\\)"):
        patch(tmp_path, "format: caffe\nops: [{op: remove_field, select: {type: Pooling}, field: pooling_param.ceil_mode}]\n")
    with pytest.raises(PatchError, match="'AVERAGE' is not one of MAX, AVE, STOCHASTIC"):
        patch(tmp_path, "format: caffe\nops: [{op: set_field, select: {type: Pooling}, field: pooling_param.pool, "
                        "value: AVERAGE}]\n")
    with pytest.raises(PatchError, match="field 'bottom' is part of the graph"):
        patch(tmp_path, "format: caffe\nops: [{op: set_field, select: {type: Pooling}, field: bottom, value: x}]\n")


def test_insert_after_and_before(tmp_path):
    net, model, text, _, _ = patch(tmp_path, """\
        format: caffe
        ops:
          - op: insert_after
            select: {name: relu1}
            node: {type: Pooling, name: gap, params: {pooling_param: {pool: AVE, global_pooling: true}}}
          - op: remove_node
            select: {name: pool1}
          - op: insert_before
            select: {type: InnerProduct}
            node: {type: Flatten, name: flat, output: flat_out}
        """, weights=caffe_weights("bvlc", 4))
    names = [la.name for la in net.layer]
    assert names == ["data", "conv1", "relu1", "gap", "flat", "fc", "relu2"]
    # gap reads relu1's value and pool1 read gap; with pool1 removed its reader (fc, now flat) reads gap
    assert list(layer(net, "gap").bottom) == ["conv1"] and list(layer(net, "gap").top) == ["gap"]
    assert list(layer(net, "flat").bottom) == ["gap"] and list(layer(net, "fc").bottom) == ["flat_out"]
    assert [la.name for la in model.layer] == ["conv1", "fc"]


def test_weights_that_no_longer_fit_fail_the_check(tmp_path):
    with pytest.raises(StageFailed, match=r"layer fc \[InnerProduct\] now needs weights of shape \[5, 4\], \[5\] "
                                          r"but has \[5, 180\], \[5\]"):
        patch(tmp_path, """\
            format: caffe
            ops:
              - op: insert_before
                select: {name: fc}
                node: {type: Pooling, name: gap, params: {pooling_param: {pool: AVE, global_pooling: true}}}
            """)


def test_same_size_but_transposed_weights_fail_the_check(tmp_path):
    """Caffe aborts the process on a blob shape mismatch, so equal element counts are not enough."""
    with pytest.raises(StageFailed, match=r"layer fc \[InnerProduct\] now needs weights of shape \[180, 5\]"):
        patch(tmp_path, """\
            format: caffe
            ops:
              - op: set_field
                select: {name: fc}
                field: inner_product_param.transpose
                value: true
            """)


def test_a_misspelt_field_fails_even_when_optional(tmp_path):
    with pytest.raises(PatchError, match=r"pooling_param.ceil_mod does not exist in any Caffe dialect"):
        patch(tmp_path, """\
            format: caffe
            ops:
              - op: remove_field
                select: {type: Pooling}
                field: pooling_param.ceil_mod
                optional: true
            """)


def test_inserting_a_weighted_layer_is_refused(tmp_path):
    with pytest.raises(PatchError, match="needs learned weights"):
        patch(tmp_path, """\
            format: caffe
            ops:
              - op: insert_after
                select: {name: fc}
                node: {type: InnerProduct, name: fc2, params: {inner_product_param: {num_output: 3}}}
            """)


def test_a_patch_that_breaks_the_net_fails_the_stage(tmp_path):
    with pytest.raises(StageFailed, match=r"patch .*p\.yml broke the graph: net\.prototxt: .*layer pool1 "
                                          r"\[Pooling\]: output would be"):
        patch(tmp_path, "format: caffe\nops: [{op: set_field, select: {type: Pooling}, field: pooling_param.kernel_size, "
                        "value: 40}]\n")


def test_no_match_and_optional(tmp_path):
    with pytest.raises(PatchError, match=r"p\.yml:4:5: ops\[1\] \(remove_node\): select \{type: Dropout\} matched no "
                                         r"layer in net\.prototxt"):
        patch(tmp_path, """\
            format: caffe
            ops:
              - {op: rename_node, select: {name: fc}, to: fc}
              - {op: remove_node, select: {type: Dropout}}
            """)
    *_, rec = patch(tmp_path, "format: caffe\nops: [{op: remove_node, select: {type: Dropout}, optional: true}]\n",
                    name="q.yml")
    assert rec[0]["ops"] == [{"op": "remove_node", "matched": 0, "skipped": True}]


def test_selectors(tmp_path):
    net, *_ = patch(tmp_path, """\
        format: caffe
        ops:
          - {op: rename_node, select: {consumer_of: data}, to: stem}
          - {op: rename_node, select: {producer_of: pool1, type: Pooling}, to: p1}
          - {op: rename_node, select: {regex: "relu[2]"}, to: last_relu}
          - {op: rename_node, select: {regex: "relu"}, to: never, optional: true}
        """)
    assert [la.name for la in net.layer] == ["data", "stem", "relu1", "p1", "fc", "last_relu"]


# ------------------------------------------------------------------------------- pooling rounding


def test_convert_pooling_same_shape_just_drops_the_field(tmp_path):
    # kernel 2 stride 2 on 16x8: floor and ceil agree, so the field can go
    net_text = caffe_net(FLOOR).replace("kernel_size: 3 stride: 2 pad: 1", "kernel_size: 2 stride: 2")
    net, _, text, _, rec = patch(tmp_path, "format: caffe\nops: [{op: convert_pooling_rounding, to: bvlc}]\n",
                                 dialect="ceil_mode", net=net_text, weights=caffe_weights("ceil_mode", 4 * 8 * 4))
    assert "ceil_mode" not in text and "Slice" not in text
    S.parse_prototxt(text, "bvlc")
    assert rec[0]["ops"][0]["matched"] == 1


def test_convert_pooling_refuses_a_shape_change(tmp_path):
    with pytest.raises(NotExpressible, match="pool1 \\[Pooling\\] rounds down .*gives 8x4, BVLC rounding would "
                                             "give 9x5"):
        patch(tmp_path, "format: caffe\nops: [{op: convert_pooling_rounding, to: bvlc}]\n", dialect="ceil_mode",
              net=caffe_net(FLOOR), weights=caffe_weights("ceil_mode", FC_FLOOR))


def test_convert_pooling_slice_is_exact(tmp_path):
    net_text = caffe_net(FLOOR)
    src_w = caffe_weights("ceil_mode", FC_FLOOR)
    net, model, text, out_w, _ = patch(tmp_path, """\
        format: caffe
        ops:
          - {op: convert_pooling_rounding, to: bvlc, on_shape_change: slice}
        """, dialect="ceil_mode", net=net_text, weights=src_w)
    assert "ceil_mode" not in text
    bvlc = S.parse_prototxt(text, "bvlc")  # now also a stock-Caffe net
    assert [la.type for la in bvlc.layer][3:7] == ["Pooling", "Slice", "Slice", "Silence"]
    assert list(layer(net, "fc").bottom) == ["pool1"]  # the cropped blob keeps the name
    # numerically the same as the floor-pooling net, through real Caffe (the fork reads both)
    (tmp_path / "a.prototxt").write_text(net_text)
    (tmp_path / "a.caffemodel").write_bytes(src_w)
    (tmp_path / "b.prototxt").write_text(text)
    (tmp_path / "b.caffemodel").write_bytes(out_w)
    x = np.random.default_rng(1).uniform(0, 255, (1, 3, 16, 8)).astype(np.float32)
    a = caffe_forward(tmp_path / "a.prototxt", tmp_path / "a.caffemodel", x)
    b = caffe_forward(tmp_path / "b.prototxt", tmp_path / "b.caffemodel", x)
    assert list(a) == ["fc"] and list(b) == ["fc"]
    np.testing.assert_array_equal(a["fc"], b["fc"])


def test_convert_pooling_ave_with_pad_is_exact(tmp_path):
    net_text = caffe_net(FLOOR).replace("pool: MAX", "pool: AVE")
    src_w = caffe_weights("ceil_mode", FC_FLOOR)
    _, _, text, out_w, _ = patch(tmp_path, "format: caffe\nops: [{op: convert_pooling_rounding, to: bvlc, "
                                           "on_shape_change: slice}]\n", dialect="ceil_mode", net=net_text, weights=src_w)
    (tmp_path / "a.prototxt").write_text(net_text)
    (tmp_path / "a.caffemodel").write_bytes(src_w)
    (tmp_path / "b.prototxt").write_text(text)
    (tmp_path / "b.caffemodel").write_bytes(out_w)
    x = np.random.default_rng(2).uniform(0, 255, (1, 3, 16, 8)).astype(np.float32)
    a = caffe_forward(tmp_path / "a.prototxt", tmp_path / "a.caffemodel", x)
    b = caffe_forward(tmp_path / "b.prototxt", tmp_path / "b.caffemodel", x)
    np.testing.assert_allclose(a["fc"], b["fc"], rtol=1e-6, atol=1e-5)


def test_convert_pooling_on_a_bvlc_net_matches_nothing(tmp_path):
    with pytest.raises(PatchError, match="already rounds like BVLC Caffe"):
        patch(tmp_path, "format: caffe\nops: [{op: convert_pooling_rounding, to: bvlc}]\n")
    *_, rec = patch(tmp_path, "format: caffe\nops: [{op: convert_pooling_rounding, to: bvlc, optional: true}]\n",
                    name="q.yml")
    assert rec[0]["ops"][0] == {"op": "convert_pooling_rounding", "matched": 0, "skipped": True}
    with pytest.raises(NotExpressible, match="bvlc dialect has no ceil_mode field"):
        patch(tmp_path, "format: caffe\nops: [{op: convert_pooling_rounding, to: ceil_mode}]\n", name="r.yml")


def test_convert_pooling_to_ceil_mode_states_it(tmp_path):
    net, _, text, _, _ = patch(tmp_path, "format: caffe\nops: [{op: convert_pooling_rounding, to: ceil_mode}]\n",
                               dialect="ceil_mode", weights=caffe_weights("ceil_mode", FC_CEIL))
    assert layer(net, "pool1").pooling_param.ceil_mode is True and "ceil_mode: true" in text


def test_full_style_caffemodel_follows_the_prototxt(tmp_path):
    """A caffemodel that stores whole layers (as Caffe's own net.save does) gets whole patched layers back."""
    src = S.parse_prototxt(caffe_net(), "bvlc")
    w = S.parse_caffemodel(caffe_weights("bvlc", FC_CEIL), "bvlc")
    full = S.new_net("bvlc")
    full.CopyFrom(src)
    for la in full.layer:
        for wl in w.layer:
            if wl.name == la.name:
                la.blobs.extend(wl.blobs)
    _, model, *_ = patch(tmp_path, "format: caffe\nops: [{op: rename_tensor, select: {last: true}, to: feat}, "
                                   "{op: rename_node, select: {name: fc}, to: head}]\n", weights=S.net_to_binary(full))
    head = layer(model, "head")
    assert list(head.bottom) == ["pool1"] and list(head.top) == ["fc"] and len(head.blobs) == 2
    assert [la.name for la in model.layer if len(la.blobs)] == ["conv1", "head"]


def test_caffe_diff(tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text(caffe_net())
    a = write_patch(tmp_path, "a.yml", "format: caffe\nops: [{op: rename_tensor, select: {last: true}, to: feat}]\n")
    b = write_patch(tmp_path, "b.yml", "format: caffe\nops: [{op: rename_node, select: {name: fc}, to: head}]\n")
    diffs = diff_patches("caffe", [a, b], [proto, tmp_path / "net.caffemodel"], dialect="bvlc")
    assert [p.name for p, _ in diffs] == ["a.yml", "b.yml"]
    assert '-  top: "fc"\n+  top: "feat"\n' in diffs[0][1]
    assert '-  name: "fc"\n+  name: "head"\n' in diffs[1][1] and "feat" not in diffs[1][1].replace(' "feat"', "")


def test_caffe_pool_size_matches_integer_arithmetic():
    """Caffe divides in float32; on every small geometry that must equal exact integer ceil/floor (+ clip)."""
    from reidbuild.caffe.shapes import caffe_pool_size

    def exact(d, k, s, p, ceil, any_pad):
        num = d + 2 * p - k
        out = (-(-num // s) if ceil else num // s) + 1
        return out - 1 if any_pad and (out - 1) * s >= d + p else out

    for d in range(1, 20):
        for k in range(1, 6):
            for s in range(1, 4):
                for p in range(0, k):
                    if d + 2 * p < k:
                        continue
                    for ceil in (False, True):
                        for any_pad in ({False, True} if p == 0 else {True}):
                            assert caffe_pool_size(d, k, s, p, ceil, any_pad) == exact(d, k, s, p, ceil, any_pad)


def test_caffe_patches_apply_in_order(tmp_path):
    a = write_patch(tmp_path, "a.yml", "format: caffe\nops: [{op: rename_tensor, select: {last: true}, to: emb}]\n")
    b = write_patch(tmp_path, "b.yml", "format: caffe\nops: [{op: rename_tensor, tensor: emb, to: feat}]\n")
    text, _, rec = apply_caffe(caffe_net(), None, load_patches([a, b]), dialect="bvlc", input_shape=None, what="net")
    assert S.parse_prototxt(text, "bvlc").layer[-1].top[0] == "feat" and [r["file"] for r in rec] == ["a.yml", "b.yml"]
    with pytest.raises(PatchError, match="b.yml.*blob 'emb' does not exist"):
        apply_caffe(caffe_net(), None, load_patches([b, a]), dialect="bvlc", input_shape=None, what="net")
