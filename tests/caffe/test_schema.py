"""reidbuild's own Caffe schema: field numbers are Caffe's, dialects differ only where they must."""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from reidbuild.caffe import schema as S
from tests.caffe._util import need

# format facts from BVLC caffe.proto (src/caffe/proto/caffe.proto), checked independently of any build
FACTS = {
    ("NetParameter", "name"): 1, ("NetParameter", "input"): 3, ("NetParameter", "layer"): 100,
    ("LayerParameter", "name"): 1, ("LayerParameter", "type"): 2, ("LayerParameter", "bottom"): 3,
    ("LayerParameter", "top"): 4, ("LayerParameter", "blobs"): 7,
    ("LayerParameter", "convolution_param"): 106, ("LayerParameter", "pooling_param"): 121,
    ("LayerParameter", "batch_norm_param"): 139, ("LayerParameter", "scale_param"): 142,
    ("LayerParameter", "input_param"): 143, ("LayerParameter", "inner_product_param"): 117,
    ("LayerParameter", "eltwise_param"): 110, ("LayerParameter", "reshape_param"): 133,
    ("LayerParameter", "mvn_param"): 120, ("LayerParameter", "power_param"): 122,
    ("LayerParameter", "slice_param"): 126, ("LayerParameter", "concat_param"): 104,
    ("BlobProto", "shape"): 7, ("BlobProto", "data"): 5, ("BlobShape", "dim"): 1,
    ("PoolingParameter", "global_pooling"): 12, ("ConvolutionParameter", "dilation"): 18,
    ("MVNParameter", "eps"): 3, ("BatchNormParameter", "eps"): 3,
}


@pytest.mark.parametrize("dialect", S.DIALECTS)
def test_field_numbers_are_caffes(dialect):
    for (msg, fld), number in FACTS.items():
        assert S.message_class(msg, dialect).DESCRIPTOR.fields_by_name[fld].number == number, (msg, fld)
    for msg, fld in (("BlobProto", "data"), ("BlobShape", "dim")):
        assert S.message_class(msg, dialect).DESCRIPTOR.fields_by_name[fld].GetOptions().packed


def test_dialects_differ_only_in_pooling_field_13():
    bvlc = S.message_class("PoolingParameter", "bvlc").DESCRIPTOR
    fork = S.message_class("PoolingParameter", "ceil_mode").DESCRIPTOR
    assert 13 not in bvlc.fields_by_number
    f = fork.fields_by_number[13]
    assert (f.name, f.type, f.default_value) == ("ceil_mode", f.TYPE_BOOL, True)
    assert S.parse_prototxt("layer { pooling_param { ceil_mode: false } }", "ceil_mode").layer[0] \
        .pooling_param.ceil_mode is False
    with pytest.raises(text_format.ParseError, match="ceil_mode"):
        S.parse_prototxt("layer { pooling_param { ceil_mode: false } }", "bvlc")
    # BVLC master's round_mode enum (same number, opposite meaning) is in neither dialect
    for d in S.DIALECTS:
        with pytest.raises(text_format.ParseError):
            S.parse_prototxt("layer { pooling_param { round_mode: FLOOR } }", d)


@pytest.mark.parametrize("dialect", S.DIALECTS)
def test_every_field_matches_the_real_caffe_pb2(dialect):
    """Name, number, label and type of every declared field equal those of the built Caffe's caffe_pb2."""
    need("pycaffe")
    from caffe.proto import caffe_pb2  # type: ignore[import-not-found]

    for name in ("NetParameter", "LayerParameter", "BlobProto", "BlobShape", "PoolingParameter",
                 "ConvolutionParameter", "BatchNormParameter", "ScaleParameter", "EltwiseParameter",
                 "InnerProductParameter", "ReshapeParameter", "FlattenParameter", "PowerParameter", "MVNParameter",
                 "SliceParameter", "ConcatParameter", "SoftmaxParameter", "InputParameter", "ReLUParameter",
                 "ReductionParameter", "TileParameter", "ExpParameter", "LogParameter", "BiasParameter"):
        mine = S.message_class(name, dialect).DESCRIPTOR
        theirs = getattr(caffe_pb2, name).DESCRIPTOR
        for f in mine.fields:
            t = theirs.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated, f.is_packed) == (t.number, t.type, t.is_repeated, t.is_packed), \
                f"{name}.{f.name}"
            if f.has_default_value:
                assert f.default_value == pytest.approx(t.default_value), f"{name}.{f.name} default"
        for e in mine.enum_types:
            assert {v.name: v.number for v in e.values} == \
                {v.name: v.number for v in theirs.enum_types_by_name[e.name].values}


@pytest.mark.parametrize("dialect", S.DIALECTS)
def test_caffemodel_round_trips_through_real_caffe_pb2(dialect):
    need("pycaffe")
    from caffe.proto import caffe_pb2  # type: ignore[import-not-found]

    net = S.new_net(dialect)
    layer = net.layer.add(name="conv", type="Convolution")
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    S.fill_blob(layer.blobs.add(), w)
    theirs = caffe_pb2.NetParameter.FromString(S.net_to_binary(net))
    assert list(theirs.layer[0].blobs[0].shape.dim) == [4, 3, 3, 3]
    np.testing.assert_array_equal(np.asarray(theirs.layer[0].blobs[0].data, np.float32).reshape(w.shape), w)
    np.testing.assert_array_equal(S.blob_array(S.parse_caffemodel(S.net_to_binary(net), dialect).layer[0].blobs[0]), w)


@pytest.mark.parametrize("dialect", S.DIALECTS)
def test_text_round_trip_and_dialect_of(dialect):
    text = ('name: "n"\nlayer {\n  name: "p"\n  type: "Pooling"\n  bottom: "input"\n  top: "p"\n'
            '  pooling_param {\n    pool: AVE\n    global_pooling: true\n  }\n}\n')
    msg = S.parse_prototxt(text, dialect)
    assert S.net_to_text(msg) == text
    assert S.dialect_of(msg) == dialect and S.dialect_of(msg.layer[0].pooling_param) == dialect


def test_unknown_dialect_is_refused():
    with pytest.raises(ValueError, match="unknown Caffe dialect"):
        S.net_class("master")
