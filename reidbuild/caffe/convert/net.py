"""The Caffe net a conversion builds (layers in order, every blob's exact shape) and small ONNX helpers.

Kept apart from the graph walk so the clean-up passes and the emitter work on a plain net, without the
converter's ONNX state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ...errors import StageFailed
from ..shapes import Shape

Params = dict[str, Any]  # a layer's parameter messages as nested dicts, e.g. {"pooling_param": {"pool": "MAX"}}


@dataclass
class Layer:
    """One Caffe layer: what the prototxt says about it and, for learned layers, its weight blobs."""

    name: str
    type: str
    bottom: list[str]
    top: list[str]
    params: Params = field(default_factory=dict)
    blobs: list[np.ndarray] = field(default_factory=list)


@dataclass
class Lazy:
    """A value not materialised as a blob (yet): a broadcast (ONNX Expand) or a MatMul kept for reassociation."""

    kind: str  # "expand" | "matmul"
    shape: Shape
    node: str  # the ONNX node that produced it, for error messages
    blob: str = ""  # expand: the source blob
    left: str = ""  # matmul: left and right operand blobs (already materialised)
    right: str = ""
    scale: float = 1.0  # matmul: a scalar factor folded into the product


class Net:
    """Layers in topological order plus the exact shape Caffe will give each blob."""

    def __init__(self, reserved: set[str]) -> None:
        self.layers: list[Layer] = []
        self.shapes: dict[str, Shape] = {}
        self._layer_names: set[str] = {"input", "output"}
        self._reserved = set(reserved) | {"input", "output"}
        self._views: dict[tuple[str, Shape], str] = {}

    def unique_layer(self, base: str) -> str:
        """``base``, or ``base_<i>`` when a layer already has that name (the name is taken)."""
        name, i = base, 1
        while name in self._layer_names:
            name, i = f"{base}_{i}", i + 1
        self._layer_names.add(name)
        return name

    def unique_blob(self, base: str, allow_reserved: bool = False) -> str:
        """A blob name not in use (nor reserved for an ONNX tensor still to come)."""
        name, i = base, 1
        while name in self.shapes or (not allow_reserved and name in self._reserved):
            name, i = f"{base}_{i}", i + 1
        return name

    def add(self, type_: str, name: str, bottom: list[str], tops: list[tuple[str, Shape]],
            params: Optional[Params] = None, blobs: Optional[list[np.ndarray]] = None,
            *, top_is_onnx: bool = False) -> list[str]:
        """Append a layer; ``tops`` are (wanted name, shape). Returns the top names actually used."""
        out = []
        for want, shape in tops:
            t = want if (top_is_onnx and want not in self.shapes and want not in ("input", "output")) \
                else self.unique_blob(want)
            self.shapes[t] = tuple(int(d) for d in shape)
            out.append(t)
        self.layers.append(Layer(self.unique_layer(name), type_, list(bottom), out, params or {},
                                 [np.asarray(b, dtype=np.float32) for b in (blobs or [])]))
        return out

    def view(self, blob: str, shape: Shape, name: str, top: str = "") -> str:
        """``blob`` reinterpreted with ``shape`` (same element order): a Reshape/Flatten layer, cached.

        With ``top`` (an ONNX tensor made by a reshape-like node) the layer is named ``name`` and its top
        ``top``; otherwise it is a helper named ``name/reshape`` with top ``blob/view``.
        """
        shape = tuple(int(d) for d in shape)
        cur = self.shapes[blob]
        if cur == shape:
            return blob
        if math.prod(cur) != math.prod(shape):
            raise StageFailed(f"internal error: cannot view {blob} {list(cur)} as {list(shape)}")
        key = (blob, shape)
        if key not in self._views:
            if top:
                made = self.add("Reshape", name, [blob], [(top, shape)], top_is_onnx=True)[0]
            else:
                made = self.add("Reshape", f"{name}/reshape", [blob], [(f"{blob}/view", shape)])[0]
            self._views[key] = made
        return self._views[key]


# ------------------------------------------------------------------------------------------- ONNX helpers


def attrs(node: Any) -> dict[str, Any]:
    """An ONNX node's attributes as Python values (strings decoded)."""
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def fold(node: Any, inputs: list[Optional[np.ndarray]], opset: int) -> list[np.ndarray]:
    """Evaluate a node whose inputs are all constants with onnx's reference evaluator.

    The evaluator gets its own copy of the node: it lives in a reference cycle until the next garbage
    collection, and a node of the parsed graph would keep the whole model's protobuf arena, weights included,
    alive that long (an R101: 170 MB more through the rest of the conversion)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    own = onnx.NodeProto()
    own.CopyFrom(node)
    names = [i for i in node.input]
    feeds = {n: v for n, v in zip(names, inputs) if n}
    try:
        return list(ReferenceEvaluator(own, opsets={"": opset}).run(None, feeds))
    except Exception as exc:  # noqa: BLE001 - the evaluator raises whatever the op raises
        raise StageFailed(f"cannot fold constant node {node.name or node.op_type} ({node.op_type}): "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def norm_axis(axis: int, rank: int) -> int:
    """A possibly negative ONNX axis as a non-negative one."""
    return axis + rank if axis < 0 else axis


def f32(x: float) -> float:
    """The float32 value of ``x`` as a Python float (what a prototxt float field stores)."""
    return float(np.float32(x))
