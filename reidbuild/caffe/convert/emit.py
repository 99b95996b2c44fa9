"""Emission: a converted net as the two Caffe files (prototxt text, caffemodel bytes) of one dialect.

Every message is built with the dialect's own schema (``reidbuild.caffe.schema``) and the text is parsed
back with it, so what is written is what the dialect reads. Serialization is deterministic: the same
model gives the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import StageFailed
from .. import schema
from ..shapes import Shape
from .handlers import build_net
from .net import Net


def _fill(msg: Any, values: dict[str, Any]) -> None:
    """Set the fields of protobuf ``msg`` from nested dicts (enum names, repeated and sub-messages)."""
    for key, v in values.items():
        fd = msg.DESCRIPTOR.fields_by_name.get(key)
        if fd is None:
            raise StageFailed(f"internal error: {msg.DESCRIPTOR.name} has no field {key!r} in this dialect")
        if fd.message_type is not None:
            if isinstance(v, list):
                for item in v:
                    _fill(getattr(msg, key).add(), item)
            else:
                _fill(getattr(msg, key), v)
        elif fd.enum_type is not None:
            setattr(msg, key, fd.enum_type.values_by_name[v].number)
        elif isinstance(v, list):
            getattr(msg, key).extend(v)
        else:
            setattr(msg, key, v)


def to_messages(net: Net, dialect: str, name: str) -> tuple[Any, Any]:
    """(prototxt NetParameter, caffemodel NetParameter) of a converted net."""
    proto = schema.new_net(dialect)
    proto.name = name
    weights = schema.new_net(dialect)
    weights.name = name
    for layer in net.layers:
        lp = proto.layer.add(name=layer.name, type=layer.type)
        lp.bottom.extend(layer.bottom)
        lp.top.extend(layer.top)
        _fill(lp, layer.params)
        if layer.blobs:
            lw = weights.layer.add(name=layer.name, type=layer.type)
            for arr in layer.blobs:
                schema.fill_blob(lw.blobs.add(), arr)
    return proto, weights


@dataclass(frozen=True)
class Conversion:
    prototxt: str
    caffemodel: bytes
    layer_types: dict[str, int]  # Caffe layer type -> count, sorted by type
    input_shape: Shape
    output_shape: Shape

    @property
    def layer_count(self) -> int:
        return sum(self.layer_types.values())


def convert_detailed(model: Any, dialect: str, input_shape: tuple[int, int, int, int], *,
                     name: str = "reidbuild") -> Conversion:
    """Like :func:`convert`, plus the facts a lock records (layer histogram, shapes)."""
    net = build_net(model, dialect, input_shape)
    proto, weights = to_messages(net, dialect, name)
    text = schema.net_to_text(proto)
    schema.parse_prototxt(text, dialect)  # what is written must parse with the dialect's own schema
    hist: dict[str, int] = {}
    for layer in net.layers:
        hist[layer.type] = hist.get(layer.type, 0) + 1
    output_shape = net.shapes["output"]
    del net  # its weight arrays are copied into ``weights``: one copy fewer while serializing (R50: ~100 MB)
    return Conversion(text, schema.net_to_binary(weights), dict(sorted(hist.items())),
                      tuple(input_shape), output_shape)


def convert(model: Any, dialect: str, input_shape: tuple[int, int, int, int], *,
            name: str = "reidbuild") -> tuple[str, bytes]:
    """ONNX ``model`` -> (prototxt text, caffemodel bytes) for ``dialect``; input ``input``, output ``output``.

    ``input_shape`` is (N, 3, H, W) with N the prototxt's batch. Raises ``NotExpressible`` for a construct
    with no faithful Caffe equivalent and ``StageFailed`` for a malformed model. Pure and deterministic: the
    same model gives the same bytes.
    """
    c = convert_detailed(model, dialect, input_shape, name=name)
    return c.prototxt, c.caffemodel
