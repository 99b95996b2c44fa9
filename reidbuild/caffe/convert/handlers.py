"""The op table: every ONNX op the converter maps, by family, and the walk that uses it."""
from __future__ import annotations

from typing import Any

from . import elementwise_ops, linear_ops, norm_ops, shape_ops, spatial_ops
from .net import Net
from .walk import Converter, Handler

HANDLERS: dict[str, Handler] = {
    **shape_ops.HANDLERS, **elementwise_ops.HANDLERS, **norm_ops.HANDLERS, **spatial_ops.HANDLERS,
    **linear_ops.HANDLERS,
}


def build_net(model: Any, dialect: str, input_shape: tuple[int, int, int, int]) -> Net:
    """The converted net (layers and blob shapes) before serialization."""
    return Converter(model, dialect, input_shape, HANDLERS).run()  # reads the model, never modifies it
