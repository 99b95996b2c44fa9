"""reidbuild's own Caffe protobuf schema: the messages and fields it writes, one variant per dialect.

Writing a prototxt or caffemodel needs no Caffe installation: the message classes are built here from a
``FileDescriptorProto`` assembled in code. Field names and numbers are format facts taken from Caffe's
``caffe.proto`` (they must match for real Caffe and OpenCV to read the binary ``.caffemodel``); only the
messages and fields reidbuild uses are declared, so a prototxt that uses anything else does not parse.

Dialects differ in ``PoolingParameter`` field 13:

* ``bvlc``: stock BVLC Caffe 1.0, no field 13 at all (pooling always rounds up: ceil).
* ``ceil_mode``: the fork field ``optional bool ceil_mode = 13 [default = true]`` (also read by OpenCV).

BVLC master later put ``optional RoundMode round_mode = 13`` (an enum, ``CEIL = 0``, ``FLOOR = 1``) on the
same number with the opposite meaning, so a net is only ever read with the dialect it was written for.
"""
from __future__ import annotations

import functools
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

DIALECTS = ("bvlc", "ceil_mode")

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_SCALARS = {"string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE,
            "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32, "int64": _F.TYPE_INT64}

# (label, type, name, number, default or None, packed); a type that is not a scalar names a message or enum
# (enums are written "enum:Name").
_Field = tuple[str, str, str, int, Any, bool]


def _fields_common() -> dict[str, list[_Field]]:
    return {
        "BlobShape": [("repeated", "int64", "dim", 1, None, True)],
        "BlobProto": [
            ("optional", "BlobShape", "shape", 7, None, False),
            ("repeated", "float", "data", 5, None, True),
            ("repeated", "float", "diff", 6, None, True),
            ("repeated", "double", "double_data", 8, None, True),
            ("repeated", "double", "double_diff", 9, None, True),
            ("optional", "int32", "num", 1, 0, False),
            ("optional", "int32", "channels", 2, 0, False),
            ("optional", "int32", "height", 3, 0, False),
            ("optional", "int32", "width", 4, 0, False),
        ],
        "NetParameter": [
            ("optional", "string", "name", 1, None, False),
            ("repeated", "string", "input", 3, None, False),
            ("repeated", "BlobShape", "input_shape", 8, None, False),
            ("repeated", "int32", "input_dim", 4, None, False),
            ("optional", "bool", "force_backward", 5, False, False),
            ("repeated", "LayerParameter", "layer", 100, None, False),
        ],
        "LayerParameter": [
            ("optional", "string", "name", 1, None, False),
            ("optional", "string", "type", 2, None, False),
            ("repeated", "string", "bottom", 3, None, False),
            ("repeated", "string", "top", 4, None, False),
            ("optional", "enum:Phase", "phase", 10, None, False),
            ("repeated", "BlobProto", "blobs", 7, None, False),
            ("optional", "BatchNormParameter", "batch_norm_param", 139, None, False),
            ("optional", "BiasParameter", "bias_param", 141, None, False),
            ("optional", "ConcatParameter", "concat_param", 104, None, False),
            ("optional", "ConvolutionParameter", "convolution_param", 106, None, False),
            ("optional", "DropoutParameter", "dropout_param", 108, None, False),
            ("optional", "EltwiseParameter", "eltwise_param", 110, None, False),
            ("optional", "ExpParameter", "exp_param", 111, None, False),
            ("optional", "FlattenParameter", "flatten_param", 135, None, False),
            ("optional", "InnerProductParameter", "inner_product_param", 117, None, False),
            ("optional", "InputParameter", "input_param", 143, None, False),
            ("optional", "LogParameter", "log_param", 134, None, False),
            ("optional", "MVNParameter", "mvn_param", 120, None, False),
            ("optional", "PoolingParameter", "pooling_param", 121, None, False),
            ("optional", "PowerParameter", "power_param", 122, None, False),
            ("optional", "PReLUParameter", "prelu_param", 131, None, False),
            ("optional", "ReductionParameter", "reduction_param", 136, None, False),
            ("optional", "ReLUParameter", "relu_param", 123, None, False),
            ("optional", "ReshapeParameter", "reshape_param", 133, None, False),
            ("optional", "ScaleParameter", "scale_param", 142, None, False),
            ("optional", "SliceParameter", "slice_param", 126, None, False),
            ("optional", "SoftmaxParameter", "softmax_param", 125, None, False),
            ("optional", "TileParameter", "tile_param", 138, None, False),
        ],
        "BatchNormParameter": [
            ("optional", "bool", "use_global_stats", 1, None, False),
            ("optional", "float", "moving_average_fraction", 2, 0.999, False),
            ("optional", "float", "eps", 3, 1e-5, False),
        ],
        "BiasParameter": [
            ("optional", "int32", "axis", 1, 1, False),
            ("optional", "int32", "num_axes", 2, 1, False),
        ],
        "ConcatParameter": [
            ("optional", "int32", "axis", 2, 1, False),
        ],
        "ConvolutionParameter": [
            ("optional", "uint32", "num_output", 1, None, False),
            ("optional", "bool", "bias_term", 2, True, False),
            ("repeated", "uint32", "pad", 3, None, False),
            ("optional", "uint32", "pad_h", 9, 0, False),
            ("optional", "uint32", "pad_w", 10, 0, False),
            ("repeated", "uint32", "kernel_size", 4, None, False),
            ("optional", "uint32", "kernel_h", 11, None, False),
            ("optional", "uint32", "kernel_w", 12, None, False),
            ("repeated", "uint32", "dilation", 18, None, False),
            ("repeated", "uint32", "stride", 6, None, False),
            ("optional", "uint32", "stride_h", 13, 1, False),
            ("optional", "uint32", "stride_w", 14, 1, False),
            ("optional", "uint32", "group", 5, 1, False),
            ("optional", "int32", "axis", 16, 1, False),
        ],
        "DropoutParameter": [
            ("optional", "float", "dropout_ratio", 1, 0.5, False),
        ],
        "EltwiseParameter": [
            ("optional", "enum:EltwiseOp", "operation", 1, "SUM", False),
            ("repeated", "float", "coeff", 2, None, False),
        ],
        "ExpParameter": [
            ("optional", "float", "base", 1, -1.0, False),
            ("optional", "float", "scale", 2, 1.0, False),
            ("optional", "float", "shift", 3, 0.0, False),
        ],
        "FlattenParameter": [
            ("optional", "int32", "axis", 1, 1, False),
            ("optional", "int32", "end_axis", 2, -1, False),
        ],
        "InnerProductParameter": [
            ("optional", "uint32", "num_output", 1, None, False),
            ("optional", "bool", "bias_term", 2, True, False),
            ("optional", "int32", "axis", 5, 1, False),
            ("optional", "bool", "transpose", 6, False, False),
        ],
        "InputParameter": [
            ("repeated", "BlobShape", "shape", 1, None, False),
        ],
        "LogParameter": [
            ("optional", "float", "base", 1, -1.0, False),
            ("optional", "float", "scale", 2, 1.0, False),
            ("optional", "float", "shift", 3, 0.0, False),
        ],
        "MVNParameter": [
            ("optional", "bool", "normalize_variance", 1, True, False),
            ("optional", "bool", "across_channels", 2, False, False),
            ("optional", "float", "eps", 3, 1e-9, False),
        ],
        "PoolingParameter": [
            ("optional", "enum:PoolMethod", "pool", 1, "MAX", False),
            ("optional", "uint32", "pad", 4, 0, False),
            ("optional", "uint32", "pad_h", 9, 0, False),
            ("optional", "uint32", "pad_w", 10, 0, False),
            ("optional", "uint32", "kernel_size", 2, None, False),
            ("optional", "uint32", "kernel_h", 5, None, False),
            ("optional", "uint32", "kernel_w", 6, None, False),
            ("optional", "uint32", "stride", 3, 1, False),
            ("optional", "uint32", "stride_h", 7, None, False),
            ("optional", "uint32", "stride_w", 8, None, False),
            ("optional", "bool", "global_pooling", 12, False, False),
        ],
        "PowerParameter": [
            ("optional", "float", "power", 1, 1.0, False),
            ("optional", "float", "scale", 2, 1.0, False),
            ("optional", "float", "shift", 3, 0.0, False),
        ],
        "PReLUParameter": [
            ("optional", "bool", "channel_shared", 2, False, False),
        ],
        "ReductionParameter": [
            ("optional", "enum:ReductionOp", "operation", 1, "SUM", False),
            ("optional", "int32", "axis", 2, 0, False),
            ("optional", "float", "coeff", 3, 1.0, False),
        ],
        "ReLUParameter": [
            ("optional", "float", "negative_slope", 1, 0.0, False),
        ],
        "ReshapeParameter": [
            ("optional", "BlobShape", "shape", 1, None, False),
            ("optional", "int32", "axis", 2, 0, False),
            ("optional", "int32", "num_axes", 3, -1, False),
        ],
        "ScaleParameter": [
            ("optional", "int32", "axis", 1, 1, False),
            ("optional", "int32", "num_axes", 2, 1, False),
            ("optional", "bool", "bias_term", 4, False, False),
        ],
        "SliceParameter": [
            ("optional", "int32", "axis", 3, 1, False),
            ("repeated", "uint32", "slice_point", 2, None, False),
        ],
        "SoftmaxParameter": [
            ("optional", "int32", "axis", 2, 1, False),
        ],
        "TileParameter": [
            ("optional", "int32", "axis", 1, 1, False),
            ("optional", "int32", "tiles", 2, None, False),
        ],
    }


# enum name -> (owning message or None for file level, values)
_ENUMS: dict[str, tuple[str | None, list[tuple[str, int]]]] = {
    "Phase": (None, [("TRAIN", 0), ("TEST", 1)]),
    "EltwiseOp": ("EltwiseParameter", [("PROD", 0), ("SUM", 1), ("MAX", 2)]),
    "PoolMethod": ("PoolingParameter", [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)]),
    "ReductionOp": ("ReductionParameter", [("SUM", 1), ("ASUM", 2), ("SUMSQ", 3), ("MEAN", 4)]),
}


def _file_descriptor(dialect: str) -> descriptor_pb2.FileDescriptorProto:
    if dialect not in DIALECTS:
        raise ValueError(f"unknown Caffe dialect {dialect!r} (expected one of {', '.join(DIALECTS)})")
    fields = _fields_common()
    if dialect == "ceil_mode":
        fields["PoolingParameter"].append(("optional", "bool", "ceil_mode", 13, True, False))
    fdp = descriptor_pb2.FileDescriptorProto(name=f"reidbuild_caffe_{dialect}.proto", package="caffe",
                                             syntax="proto2")
    for ename, (owner, values) in _ENUMS.items():
        if owner is None:
            e = fdp.enum_type.add(name=ename)
            for vname, num in values:
                e.value.add(name=vname, number=num)
    for mname, flist in fields.items():
        m = fdp.message_type.add(name=mname)
        for ename, (owner, values) in _ENUMS.items():
            if owner == mname:
                e = m.enum_type.add(name=ename)
                for vname, num in values:
                    e.value.add(name=vname, number=num)
        for label, ftype, fname, number, default, packed in flist:
            f = m.field.add(name=fname, number=number, label=_REP if label == "repeated" else _OPT)
            if ftype in _SCALARS:
                f.type = _SCALARS[ftype]
            elif ftype.startswith("enum:"):
                ename = ftype[5:]
                owner = _ENUMS[ename][0]
                f.type = _F.TYPE_ENUM
                f.type_name = f".caffe.{ename}" if owner is None else f".caffe.{owner}.{ename}"
            else:
                f.type = _F.TYPE_MESSAGE
                f.type_name = f".caffe.{ftype}"
            if default is not None:
                if isinstance(default, bool):
                    f.default_value = "true" if default else "false"
                elif isinstance(default, float):
                    f.default_value = repr(default)
                else:
                    f.default_value = str(default)
            if packed:
                f.options.packed = True
    return fdp


@functools.lru_cache(maxsize=None)
def _pool(dialect: str) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(_file_descriptor(dialect).SerializeToString())
    return pool


def message_class(name: str, dialect: str) -> Any:
    """The generated class of message ``name`` (e.g. "NetParameter", "LayerParameter") for ``dialect``."""
    return message_factory.GetMessageClass(_pool(dialect).FindMessageTypeByName(f"caffe.{name}"))


def net_class(dialect: str) -> Any:
    return message_class("NetParameter", dialect)


def new_net(dialect: str) -> Any:
    return net_class(dialect)()


def dialect_of(msg: Any) -> str:
    """The dialect whose schema ``msg`` (any message of this module) was made with."""
    name = msg.DESCRIPTOR.file.name
    for d in DIALECTS:
        if name == f"reidbuild_caffe_{d}.proto":
            return d
    raise ValueError(f"{type(msg).__name__} is not a reidbuild Caffe message")


def parse_prototxt(text: str, dialect: str) -> Any:
    """Parse prototxt ``text`` with the ``dialect`` schema; a field the dialect lacks is a ParseError."""
    return text_format.Parse(text, net_class(dialect)())


def parse_caffemodel(data: bytes, dialect: str) -> Any:
    """Parse a binary ``.caffemodel`` (fields this schema does not declare are kept as unknown fields)."""
    msg = net_class(dialect)()
    msg.ParseFromString(data)
    return msg


def net_to_text(msg: Any) -> str:
    """Stable prototxt text of a NetParameter (fields in number order, shortest round-trip floats)."""
    return text_format.MessageToString(msg, as_utf8=True)


def net_to_binary(msg: Any) -> bytes:
    """Deterministic binary serialization (for the ``.caffemodel``)."""
    return bytes(msg.SerializeToString(deterministic=True))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fill_blob(blob: Any, array: Any) -> None:
    """Set a BlobProto's ``shape`` and float32 ``data`` from a numpy array (fast: packed bytes, not a list)."""
    import numpy as np

    arr = np.ascontiguousarray(np.asarray(array, dtype="<f4"))
    blob.shape.dim.extend(int(d) for d in arr.shape)
    raw = arr.tobytes()
    # field 5 (data), wire type 2 (packed), then the little-endian float32 payload
    blob.MergeFromString(b"\x2a" + _varint(len(raw)) + raw)


def blob_array(blob: Any) -> Any:
    """A BlobProto as a float32 numpy array of its shape (legacy num/channels/height/width honoured)."""
    import numpy as np

    if blob.HasField("shape"):
        shape = tuple(blob.shape.dim)
    else:
        shape = tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))
    data = blob.data if len(blob.data) else blob.double_data
    return np.asarray(data, dtype=np.float32).reshape(shape)
