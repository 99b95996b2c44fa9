"""Emission: a converted net as the two Caffe files (prototxt text, caffemodel bytes) of one dialect.

Every message is built with the dialect's own schema (``reidbuild.caffe.schema``) and the text is parsed
back with it, so what is written is what the dialect reads. Serialization is deterministic: the same
model gives the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import StageFailed
from .. import schema
from ..shapes import Shape
from .handlers import build_net
from .net import Layer, Net


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
    proto = prototxt_message(net, dialect, name)
    weights = schema.new_net(dialect)
    weights.name = name
    for layer in net.layers:
        if layer.blobs:
            _weights_layer(weights, layer)
    return proto, weights


def prototxt_message(net: Net, dialect: str, name: str) -> Any:
    """The prototxt NetParameter of a converted net: layers and their parameters, no weights."""
    proto = schema.new_net(dialect)
    proto.name = name
    for layer in net.layers:
        lp = proto.layer.add(name=layer.name, type=layer.type)
        lp.bottom.extend(layer.bottom)
        lp.top.extend(layer.top)
        _fill(lp, layer.params)
    return proto


def _weights_layer(weights: Any, layer: Layer) -> None:
    """Append ``layer``'s caffemodel entry (name, type, weight blobs) to the NetParameter ``weights``."""
    lw = weights.layer.add(name=layer.name, type=layer.type)
    for arr in layer.blobs:
        schema.fill_blob(lw.blobs.add(), arr)


def caffemodel_bytes(net: Net, dialect: str, name: str, consume: bool = False) -> bytes:
    """The ``.caffemodel`` bytes of ``to_messages``' weights message, serialized one layer at a time.

    A message's encoding is its fields' encodings in field-number order (``name`` = 1, then each ``layer``
    = 100), so the concatenation of one-field messages is byte-identical to serializing the whole message,
    without holding the whole weights message (an R50: ~100 MB) next to its bytes. ``consume`` drops each
    layer's arrays once written (the caller is done with ``net``).
    """
    import io

    buf = io.BytesIO()
    head = schema.new_net(dialect)
    head.name = name
    buf.write(schema.net_to_binary(head))
    for layer in net.layers:
        if layer.blobs:
            one = schema.new_net(dialect)
            _weights_layer(one, layer)
            buf.write(schema.net_to_binary(one))
            if consume:
                layer.blobs = []
    return buf.getvalue()


@dataclass(frozen=True)
class Conversion:
    """A conversion's two files plus the facts the lock records about it."""

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
    return _conversion(build_net(model, dialect, input_shape), dialect, input_shape, name)


def convert_file(path: Path, dialect: str, input_shape: tuple[int, int, int, int], *,
                 name: str = "reidbuild") -> Conversion:
    """``convert_detailed`` of the ONNX file ``path``, dropping the parsed model as soon as the net holds its
    own copy of the weights (an R50: ~100 MB fewer while serializing; clearing a protobuf field would not
    return its memory). A missing file raises FileNotFoundError, an unreadable one StageFailed."""
    import onnx

    try:
        model = onnx.load(str(path))
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"{path.name}: not a readable ONNX model: {str(exc).splitlines()[0]}") from None
    net = build_net(model, dialect, input_shape)
    del model
    return _conversion(net, dialect, input_shape, name)


def _conversion(net: Net, dialect: str, input_shape: tuple[int, int, int, int], name: str) -> Conversion:
    """Serialize a built net; its weight arrays are dropped as they are written (the net is not reused)."""
    text = schema.net_to_text(prototxt_message(net, dialect, name))
    schema.parse_prototxt(text, dialect)  # what is written must parse with the dialect's own schema
    hist: dict[str, int] = {}
    for layer in net.layers:
        hist[layer.type] = hist.get(layer.type, 0) + 1
    return Conversion(text, caffemodel_bytes(net, dialect, name, consume=True), dict(sorted(hist.items())),
                      tuple(input_shape), net.shapes["output"])


def convert(model: Any, dialect: str, input_shape: tuple[int, int, int, int], *,
            name: str = "reidbuild") -> tuple[str, bytes]:
    """ONNX ``model`` -> (prototxt text, caffemodel bytes) for ``dialect``; input ``input``, output ``output``.

    ``input_shape`` is (N, 3, H, W) with N the prototxt's batch. Raises ``NotExpressible`` for a construct
    with no faithful Caffe equivalent and ``StageFailed`` for a malformed model. Pure and deterministic: the
    same model gives the same bytes.
    """
    c = convert_detailed(model, dialect, input_shape, name=name)
    return c.prototxt, c.caffemodel
