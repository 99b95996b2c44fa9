"""ONNX -> Caffe: a prototxt and a caffemodel that compute what the ONNX graph computes, by construction.

The simplified ONNX is the single source. Conversion first pins the batch (the prototxt has a fixed input
shape), folds every constant sub-graph (``Shape`` chains included) with onnx's reference evaluator, then maps
each remaining node to stock Caffe layers, tracking every blob's exact shape with Caffe's own formulas:

* Pooling rounding: PyTorch/ONNX round the output size down (``ceil_mode=0``), stock Caffe rounds up. The
  ``ceil_mode`` dialect writes the fork field (``ceil_mode: false``); the ``bvlc`` dialect has no such field,
  so where Caffe's ceil would produce an extra row/column the converter slices it off (a ``Slice`` layer whose
  tail goes to ``Silence``). The windows Caffe keeps start at the same positions as PyTorch's, so the values
  are the same, not approximately the same.
* Layers outside stock BVLC Caffe 1.0 are decomposed into stock layers that are exact in real arithmetic
  (e.g. InstanceNorm = MVN(mean only) -> square -> global AVE pool -> Power(-0.5, shift=eps) -> Scale, because
  Caffe's MVN adds eps to the standard deviation, not to the variance). What has no faithful equivalent raises
  ``NotExpressible`` naming the node, its op and the dialect.

Only layer types that both pycaffe (BVLC and forks) and OpenCV's Caffe importer run are emitted (no
``Reduction``, ``Tile``, ``Permute``, ``Bias``...), in both dialects.
"""
from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..errors import NotExpressible, StageFailed
from . import schema

from . import CONVERTER_VERSION  # noqa: F401 - re-exported

# ------------------------------------------------------------------------------------------ the Caffe net


@dataclass
class Layer:
    name: str
    type: str
    bottom: list[str]
    top: list[str]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    blobs: list[np.ndarray] = field(default_factory=list)


@dataclass
class _Lazy:
    """A value not materialised as a blob (yet): a broadcast (ONNX Expand) or a MatMul kept for reassociation."""

    kind: str  # "expand" | "matmul"
    shape: tuple[int, ...]
    node: str  # the ONNX node that produced it, for error messages
    blob: str = ""  # expand: the source blob
    left: str = ""  # matmul: left and right operand blobs (already materialised)
    right: str = ""
    scale: float = 1.0  # matmul: a scalar factor folded into the product


class _Net:
    """Layers in topological order plus the exact shape Caffe will give each blob."""

    def __init__(self, reserved: set[str]) -> None:
        self.layers: list[Layer] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._layer_names: set[str] = {"input", "output"}
        self._reserved = set(reserved) | {"input", "output"}
        self._views: dict[tuple[str, tuple[int, ...]], str] = {}

    def unique_layer(self, base: str) -> str:
        name, i = base, 1
        while name in self._layer_names:
            name, i = f"{base}_{i}", i + 1
        self._layer_names.add(name)
        return name

    def unique_blob(self, base: str, allow_reserved: bool = False) -> str:
        name, i = base, 1
        while name in self.shapes or (not allow_reserved and name in self._reserved):
            name, i = f"{base}_{i}", i + 1
        return name

    def add(self, type_: str, name: str, bottom: list[str], tops: list[tuple[str, tuple[int, ...]]],
            params: Optional[dict[str, dict[str, Any]]] = None, blobs: Optional[list[np.ndarray]] = None,
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

    def view(self, blob: str, shape: tuple[int, ...], name: str, top: str = "") -> str:
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


def _view_params(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[str, dict[str, dict[str, Any]]]:
    """Reshape/Flatten parameters; the batch (axis 0) is copied (``dim: 0``) when it is unchanged."""
    if len(out_shape) == 2 and len(in_shape) > 2 and out_shape[0] == in_shape[0]:
        return "Flatten", {}
    dims = [0 if i == 0 and len(in_shape) > 0 and d == in_shape[0] else d for i, d in enumerate(out_shape)]
    return "Reshape", {"reshape_param": {"shape": {"dim": dims}}}


# ------------------------------------------------------------------------------------------- ONNX helpers


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _fold(node: Any, inputs: list[Optional[np.ndarray]], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    names = [i for i in node.input]
    feeds = {n: v for n, v in zip(names, inputs) if n}
    try:
        return list(ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds))
    except Exception as exc:  # noqa: BLE001 - the evaluator raises whatever the op raises
        raise StageFailed(f"cannot fold constant node {node.name or node.op_type} ({node.op_type}): "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _f32(x: float) -> float:
    """The float32 value of ``x`` as a Python float (what a prototxt float field stores)."""
    return float(np.float32(x))


# ------------------------------------------------------------------------------------------- converter


class _Converter:
    def __init__(self, model: Any, dialect: str, input_shape: tuple[int, int, int, int]) -> None:
        if dialect not in schema.DIALECTS:
            raise StageFailed(f"unknown Caffe dialect {dialect!r} (expected one of {', '.join(schema.DIALECTS)})")
        self.model = model
        self.dialect = dialect
        self.input_shape = tuple(int(d) for d in input_shape)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if not self.opset:
            raise StageFailed("the ONNX model imports no default-domain opset")
        g = model.graph
        self.consts: dict[str, np.ndarray] = {}
        from onnx import numpy_helper

        for init in g.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        self.vals: dict[str, str] = {}  # ONNX tensor -> Caffe blob
        self.lazy: dict[str, _Lazy] = {}
        names: set[str] = set()
        for n in g.node:
            names.update(n.output)
        self.net = _Net(names)
        self.consumers: dict[str, list[Any]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.node: Any = None
        self.node_label = ""
        # tensors that folding will turn into constants (Shape/Size of anything, and what only they feed)
        self.will_be_const = set(self.consts)
        for n in g.node:
            ins = [i for i in n.input if i]
            if n.op_type in ("Shape", "Size", "Constant") or all(i in self.will_be_const for i in ins):
                self.will_be_const.update(o for o in n.output if o)

    # ---- errors and small helpers

    def refuse(self, why: str) -> NotExpressible:
        return NotExpressible(f"layer {self.node_label} of op {self.node.op_type} is not expressible in Caffe "
                              f"dialect {self.dialect}: {why}")

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.consts:
            return tuple(self.consts[name].shape)
        if name in self.lazy:
            return self.lazy[name].shape
        return self.net.shapes[self.vals[name]]

    def blob(self, name: str) -> str:
        """The Caffe blob of a dynamic ONNX tensor (materialising nothing: lazy values are refused here)."""
        if name in self.vals:
            return self.vals[name]
        if name in self.lazy:
            lz = self.lazy[name]
            what = "a broadcast (Expand)" if lz.kind == "expand" else "a product of two computed tensors (MatMul)"
            raise self.refuse(f"its input {name!r} is {what} from node {lz.node} that Caffe can only use inside "
                              "an element-wise product/sum (or a MatMul chain it can reassociate)")
        if name in self.consts:
            raise self.refuse(f"input {name!r} is a constant where Caffe needs a computed blob")
        raise StageFailed(f"internal error: ONNX tensor {name!r} has no value (graph not topologically sorted?)")

    def const(self, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            raise self.refuse(f"{what} ({name!r}) must be a constant")
        return self.consts[name]

    def scalar(self, name: str, what: str) -> float:
        c = self.const(name, what)
        if c.size != 1:
            raise self.refuse(f"{what} must be a single value, got shape {list(c.shape)}")
        return float(c.reshape(-1)[0])

    def lname(self, suffix: str = "") -> str:
        return self.node_label + (f"/{suffix}" if suffix else "")

    def emit(self, type_: str, bottom: list[str], out: str, shape: tuple[int, ...], params: Optional[dict] = None,
             blobs: Optional[list[np.ndarray]] = None, suffix: str = "") -> str:
        """One layer whose top is the ONNX tensor ``out`` (or a helper blob named after it when ``suffix``)."""
        if suffix:
            top = self.net.add(type_, self.lname(suffix), bottom, [(f"{out}/{suffix}", shape)], params, blobs)[0]
        else:
            top = self.net.add(type_, self.lname(), bottom, [(out, shape)], params, blobs, top_is_onnx=True)[0]
        return top

    def set(self, onnx_name: str, blob: str) -> None:
        self.vals[onnx_name] = blob

    def view(self, blob: str, shape: tuple[int, ...]) -> str:
        return self.net.view(blob, shape, self.lname())

    def output_view(self, out: str, blob: str, shape: tuple[int, ...]) -> None:
        """Bind ONNX output ``out`` to ``blob`` viewed with ``shape``."""
        self.set(out, self.view(blob, shape))

    def power(self, blob: str, out: str, *, power: float = 1.0, scale: float = 1.0, shift: float = 0.0,
              suffix: str = "") -> str:
        p: dict[str, Any] = {}
        if power != 1.0:
            p["power"] = _f32(power)
        if scale != 1.0:
            p["scale"] = _f32(scale)
        if shift != 0.0:
            p["shift"] = _f32(shift)
        return self.emit("Power", [blob], out, self.net.shapes[blob], {"power_param": p}, suffix=suffix)

    # ---- driver

    def run(self) -> _Net:
        g = self.model.graph
        init_names = set(self.consts)
        inputs = [i for i in g.input if i.name not in init_names]
        if len(inputs) != 1:
            raise StageFailed(f"the ONNX graph must have exactly one input, it has {len(inputs)}")
        if len(g.output) != 1:
            raise StageFailed(f"the ONNX graph must have exactly one output, it has {len(g.output)}")
        inp = inputs[0]
        tt = inp.type.tensor_type
        if tt.elem_type != 1:
            raise StageFailed(f"the ONNX input {inp.name!r} must be float32 NCHW for Caffe (a patch changed it?)")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if len(dims) != 4:
            raise StageFailed(f"the ONNX input {inp.name!r} has rank {len(dims)}, expected 4 (N, 3, H, W)")
        for i, (d, want) in enumerate(zip(dims, self.input_shape)):
            if d is not None and d != want:
                hint = (" - the ONNX was exported with a fixed batch: use targets.onnx.dynamic_batch: true or "
                        f"targets.caffe.batch_size: {d}") if i == 0 else ""
                raise StageFailed(f"the ONNX input {inp.name!r} has shape {dims}, but the Caffe input is "
                                  f"{list(self.input_shape)} (dimension {i} differs){hint}")
        self.net.shapes["input"] = self.input_shape
        self.net.layers.append(Layer("input", "Input", [], ["input"],
                                     {"input_param": {"shape": [{"dim": list(self.input_shape)}]}}))
        self.vals[inp.name] = "input"
        for idx, node in enumerate(g.node):
            self.node = node
            self.node_label = node.name or f"{node.op_type}_{idx}"
            if node.domain not in ("", "ai.onnx"):
                raise self.refuse(f"custom domain {node.domain!r}")
            self.convert_node(node)
        out_name = g.output[0].name
        if out_name in self.consts:
            raise StageFailed("the ONNX output is a constant; nothing to convert")
        self.node = next((n for n in g.node if out_name in n.output), g.node[-1] if len(g.node) else None)
        self.node_label = (self.node.name or self.node.op_type) if self.node is not None else "output"
        blob = self.blob(out_name)
        self.check_value_info()
        _finish(self.net, blob)
        return self.net

    def convert_node(self, node: Any) -> None:
        ins = list(node.input)
        present = [i for i in ins if i]
        op = node.op_type
        if op == "Constant" or (present and all(i in self.consts for i in present)) or (not present):
            vals = _fold(node, [self.consts.get(i) if i else None for i in ins], self.opset)
            for name, v in zip(node.output, vals):
                if name:
                    self.consts[name] = np.asarray(v)
            return
        if op == "Shape":
            s = np.array(self.shape(ins[0]), dtype=np.int64)
            a = _attrs(node)
            r = len(s)
            start = a.get("start", 0)
            end = a.get("end", r)
            start = max(0, min(r, start + r if start < 0 else start))
            end = max(0, min(r, end + r if end < 0 else end))
            self.consts[node.output[0]] = s[start:end]
            return
        if op == "Size":
            self.consts[node.output[0]] = np.array(math.prod(self.shape(ins[0])), dtype=np.int64)
            return
        handler: Optional[Callable[[Any], None]] = getattr(self, f"op_{op}", None)
        if handler is None:
            raise self.refuse("no Caffe layer or faithful decomposition for this op")
        handler(node)

    def check_value_info(self) -> None:
        """Every shape the converter derived must agree with the shapes recorded in the ONNX (batch pinned)."""
        g = self.model.graph
        for vi in list(g.value_info) + list(g.output):
            if vi.name not in self.vals:
                continue
            dims = vi.type.tensor_type.shape.dim
            mine = self.net.shapes[self.vals[vi.name]]
            if not vi.type.tensor_type.HasField("shape"):
                continue
            recorded = [d.dim_value if d.HasField("dim_value") else "?" for d in dims]
            if len(dims) != len(mine) or any(d.HasField("dim_value") and d.dim_value != m
                                             for d, m in zip(dims, mine)):
                raise StageFailed(f"tensor {vi.name!r}: the ONNX records shape {recorded} but the converted net "
                                  f"computes {list(mine)} (stale value_info, or a converter bug)")

    # ---- aliases and views

    def _alias(self, node: Any) -> None:
        src = node.input[0]
        if src in self.lazy:
            self.lazy[node.output[0]] = self.lazy[src]
        else:
            self.set(node.output[0], self.blob(src))

    op_Identity = _alias

    def op_Dropout(self, node: Any) -> None:
        if len(node.output) > 1 and node.output[1] and self.consumers.get(node.output[1]):
            raise self.refuse("the dropout mask is used")
        self._alias(node)

    def op_Cast(self, node: Any) -> None:
        if _attrs(node).get("to") != 1:
            raise self.refuse("Caffe computes in float32 only; casting a computed tensor to another type")
        self._alias(node)

    def _reshape_to(self, node: Any, shape: tuple[int, ...]) -> None:
        src = node.input[0]
        if src in self.lazy:
            raise self.refuse("reshaping a broadcast or an unmaterialised product")
        self.set(node.output[0], self.net.view(self.blob(src), shape, self.lname(), top=node.output[0]))

    def op_Reshape(self, node: Any) -> None:
        s = self.shape(node.input[0])
        target = [int(d) for d in self.const(node.input[1], "the target shape").reshape(-1)]
        allowzero = _attrs(node).get("allowzero", 0)
        out = [s[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
        if -1 in out:
            known = math.prod(d for d in out if d != -1)
            out[out.index(-1)] = math.prod(s) // known if known else 0
        if math.prod(out) != math.prod(s):
            raise StageFailed(f"{self.node_label}: cannot reshape {list(s)} to {target}")
        self._reshape_to(node, tuple(out))

    def op_Flatten(self, node: Any) -> None:
        s = self.shape(node.input[0])
        axis = _norm_axis(_attrs(node).get("axis", 1), len(s))
        self._reshape_to(node, (math.prod(s[:axis]), math.prod(s[axis:])))

    def _axes(self, node: Any, index: int = 1) -> Optional[list[int]]:
        a = _attrs(node)
        if "axes" in a:
            return [int(x) for x in a["axes"]]
        if len(node.input) > index and node.input[index]:
            return [int(x) for x in self.const(node.input[index], "axes").reshape(-1)]
        return None

    def op_Squeeze(self, node: Any) -> None:
        s = self.shape(node.input[0])
        axes = self._axes(node)
        if axes is None:
            out = tuple(d for d in s if d != 1)
        else:
            ax = {_norm_axis(x, len(s)) for x in axes}
            out = tuple(d for i, d in enumerate(s) if i not in ax)
        self._reshape_to(node, out)

    def op_Unsqueeze(self, node: Any) -> None:
        s = list(self.shape(node.input[0]))
        axes = self._axes(node)
        if axes is None:
            raise self.refuse("Unsqueeze without axes")
        r = len(s) + len(axes)
        for ax in sorted(_norm_axis(x, r) for x in axes):
            s.insert(ax, 1)
        self._reshape_to(node, tuple(s))

    def op_Transpose(self, node: Any) -> None:
        s = self.shape(node.input[0])
        perm = _attrs(node).get("perm", list(range(len(s)))[::-1])
        out = tuple(s[p] for p in perm)
        moved = [p for p in perm if s[p] != 1]
        if moved != sorted(moved):
            raise self.refuse(f"Transpose {list(perm)} of {list(s)} moves data (stock Caffe has no Permute layer)")
        self._reshape_to(node, out)

    # ---- element-wise

    def _unary(self, type_: str, params: Optional[dict] = None) -> Callable[[Any], None]:
        def handler(node: Any) -> None:
            x = self.blob(node.input[0])
            self.set(node.output[0], self.emit(type_, [x], node.output[0], self.net.shapes[x], params))
        return handler

    def op_Relu(self, node: Any) -> None:
        self._unary("ReLU")(node)

    def op_LeakyRelu(self, node: Any) -> None:
        self._unary("ReLU", {"relu_param": {"negative_slope": _f32(_attrs(node).get("alpha", 0.01))}})(node)

    def op_Sigmoid(self, node: Any) -> None:
        self._unary("Sigmoid")(node)

    def op_Tanh(self, node: Any) -> None:
        self._unary("TanH")(node)

    def op_Exp(self, node: Any) -> None:
        self._unary("Exp")(node)

    def op_Log(self, node: Any) -> None:
        self._unary("Log")(node)

    def op_Abs(self, node: Any) -> None:
        self._unary("AbsVal")(node)

    def op_Sqrt(self, node: Any) -> None:
        self.set(node.output[0], self.power(self.blob(node.input[0]), node.output[0], power=0.5))

    def op_Reciprocal(self, node: Any) -> None:
        self.set(node.output[0], self.power(self.blob(node.input[0]), node.output[0], power=-1.0))

    def op_Neg(self, node: Any) -> None:
        self.set(node.output[0], self.power(self.blob(node.input[0]), node.output[0], scale=-1.0))

    def op_Pow(self, node: Any) -> None:
        if node.input[0] in self.consts:
            raise self.refuse("a constant raised to a computed power")
        e = self.scalar(node.input[1], "the exponent")
        x = self.blob(node.input[0])
        out_shape = tuple(np.broadcast_shapes(self.net.shapes[x], self.consts[node.input[1]].shape))
        x = self.view(x, out_shape)
        self.set(node.output[0], self.power(x, node.output[0], power=e))

    def op_Clip(self, node: Any) -> None:
        a = _attrs(node)
        lo = a.get("min")
        hi = a.get("max")
        if len(node.input) > 1 and node.input[1]:
            lo = self.scalar(node.input[1], "the minimum")
        if len(node.input) > 2 and node.input[2]:
            hi = self.scalar(node.input[2], "the maximum")
        x = self.blob(node.input[0])
        out = node.output[0]
        shape = self.net.shapes[x]
        if lo is None and hi is None:
            self.set(out, x)
            return
        cur = x
        if lo is not None:
            # max(x, lo) = relu(x - lo) + lo   (ReLU alone when lo == 0)
            if lo != 0:
                cur = self.power(cur, out, shift=-lo, suffix="min_shift")
            last = hi is None and lo == 0
            cur = self.emit("ReLU", [cur], out, shape, suffix="" if last else "min_relu")
            if lo != 0:
                cur = self.power(cur, out, shift=lo, suffix="" if hi is None else "min_unshift")
        if hi is not None:
            # min(x, hi) = hi - relu(hi - x)
            cur = self.power(cur, out, scale=-1.0, shift=hi, suffix="max_flip")
            cur = self.emit("ReLU", [cur], out, shape, suffix="max_relu")
            cur = self.power(cur, out, scale=-1.0, shift=hi)
        self.set(out, cur)

    def op_Softmax(self, node: Any) -> None:
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        r = len(s)
        default = -1 if self.opset >= 13 else 1
        axis = _norm_axis(_attrs(node).get("axis", default), r)
        out = node.output[0]
        if self.opset >= 13 or axis == r - 1:
            self.set(out, self.emit("Softmax", [x], out, s, {"softmax_param": {"axis": axis}}))
            return
        v = self.view(x, (math.prod(s[:axis]), math.prod(s[axis:])))
        y = self.emit("Softmax", [v], out, self.net.shapes[v], {"softmax_param": {"axis": 1}}, suffix="2d")
        self.output_view(out, y, s)

    def op_PRelu(self, node: Any) -> None:
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        slope = self.const(node.input[1], "the slope")
        if slope.size == 1:
            params, blob = {"prelu_param": {"channel_shared": True}}, slope.reshape(1)
        else:
            full = np.broadcast_to(slope, np.broadcast_shapes(slope.shape, s))
            if len(s) < 2 or slope.size != s[1] or full.shape != s:
                raise self.refuse(f"PReLU slopes of shape {list(slope.shape)} are not per-channel")
            params, blob = {}, slope.reshape(-1)
        self.set(node.output[0], self.emit("PReLU", [x], node.output[0], s, params, [blob]))

    def _binary(self, node: Any, op: str) -> None:
        a, b = node.input[0], node.input[1]
        out = node.output[0]
        sa, sb = self.shape(a), self.shape(b)
        out_shape = tuple(np.broadcast_shapes(sa, sb))
        ca, cb = a in self.consts, b in self.consts
        if ca and cb:  # both constant: folded before reaching here
            raise StageFailed("internal error: constant binary op not folded")
        if ca or cb:
            self._binary_const(node, op, a, b, out_shape)
            return
        la, lb = self.lazy.get(a), self.lazy.get(b)
        if la is not None and la.kind == "matmul":
            self.blob(a)  # raises the refusal for an unmaterialised product
        if lb is not None and lb.kind == "matmul":
            self.blob(b)
        xa = la.blob if la else self.blob(a)
        xb = lb.blob if lb else self.blob(b)
        self._binary_blobs(op, xa, xb, out, out_shape)

    def _binary_blobs(self, op: str, xa: str, xb: str, out: str, out_shape: tuple[int, ...]) -> None:
        sa, sb = self.net.shapes[xa], self.net.shapes[xb]
        r = len(out_shape)
        pa = (1,) * (r - len(sa)) + sa
        pb = (1,) * (r - len(sb)) + sb
        if pa == pb == out_shape:
            xa, xb = self.view(xa, out_shape), self.view(xb, out_shape)
            if op == "Add":
                y = self.emit("Eltwise", [xa, xb], out, out_shape, {"eltwise_param": {"operation": "SUM"}})
            elif op == "Sub":
                y = self.emit("Eltwise", [xa, xb], out, out_shape,
                              {"eltwise_param": {"operation": "SUM", "coeff": [1.0, -1.0]}})
            elif op == "Mul":
                y = self.emit("Eltwise", [xa, xb], out, out_shape, {"eltwise_param": {"operation": "PROD"}})
            else:  # Div
                inv = self.power(xb, out, power=-1.0, suffix="reciprocal")
                y = self.emit("Eltwise", [xa, inv], out, out_shape, {"eltwise_param": {"operation": "PROD"}})
            self.set(out, y)
            return
        # one operand broadcast over the other: Caffe's two-bottom Scale (products) only
        if op not in ("Mul", "Div"):
            raise self.refuse(f"{op} of computed tensors {list(sa)} and {list(sb)} needs a broadcast sum "
                              "(only broadcast products map to Caffe's Scale layer)")
        if op == "Div":
            if pa != out_shape:
                raise self.refuse(f"Div broadcasting the dividend {list(sa)} to {list(out_shape)}")
            xb = self.power(xb, out, power=-1.0, suffix="reciprocal")
        big, small = (xa, xb) if pa == out_shape else (xb, xa)
        ps = pb if big == xa else pa
        if self.net.shapes[big] != out_shape and (1,) * (r - len(self.net.shapes[big])) + self.net.shapes[big] != out_shape:
            raise self.refuse(f"{op} of {list(sa)} and {list(sb)}: both operands need broadcasting")
        rng = _span(ps, out_shape)
        if rng is None:
            raise self.refuse(f"{op} broadcast of {list(ps)} over {list(out_shape)} is not a contiguous "
                              "run of axes (Caffe's Scale layer cannot express it)")
        lo, hi = rng
        big = self.view(big, out_shape)
        small = self.view(small, out_shape[lo:hi])
        self.set(out, self.emit("Scale", [big, small], out, out_shape, {"scale_param": {"axis": lo}}))

    def _binary_const(self, node: Any, op: str, a: str, b: str, out_shape: tuple[int, ...]) -> None:
        out = node.output[0]
        const_first = a in self.consts
        cname, xname = (a, b) if const_first else (b, a)
        c = self.consts[cname].astype(np.float64)
        if xname in self.lazy:
            lz = self.lazy[xname]
            if lz.kind == "matmul" and c.size == 1 and op in ("Mul", "Div") and not (op == "Div" and const_first):
                v = float(c.reshape(-1)[0])
                self.lazy[out] = _Lazy("matmul", tuple(np.broadcast_shapes(lz.shape, c.shape)), lz.node,
                                       left=lz.left, right=lz.right, scale=lz.scale * (v if op == "Mul" else 1.0 / v))
                if self.lazy[out].shape != lz.shape:
                    raise self.refuse("a constant that changes the rank of a MatMul result")
                return
        x = self.blob(xname)
        sx = self.net.shapes[x]
        r = len(out_shape)
        if (1,) * (r - len(sx)) + sx != out_shape:
            raise self.refuse(f"a constant of shape {list(c.shape)} broadcasts the computed tensor {list(sx)}")
        x = self.view(x, out_shape)
        if c.size == 1:
            v = float(c.reshape(-1)[0])
            if op == "Add":
                y = self.power(x, out, shift=v)
            elif op == "Sub":
                y = self.power(x, out, scale=-1.0, shift=v) if const_first else self.power(x, out, shift=-v)
            elif op == "Mul":
                y = self.power(x, out, scale=v)
            elif const_first:  # v / x = (x / v) ** -1
                y = self.power(x, out, power=-1.0, scale=1.0 / v)
            else:
                y = self.power(x, out, scale=1.0 / v)
            self.set(out, y)
            return
        pc = (1,) * (r - c.ndim) + tuple(c.shape)
        rng = _span(pc, out_shape, allow_inner_ones=True)
        if rng is None:
            raise self.refuse(f"a constant of shape {list(c.shape)} broadcast over {list(out_shape)} is not a "
                              "contiguous run of axes")
        lo, hi = rng
        if lo == 0 and out_shape[0] != 1:
            raise self.refuse(f"a constant of shape {list(c.shape)} varies along the batch axis")
        full = np.broadcast_to(c.reshape(pc)[(0,) * lo + (slice(None),) * (hi - lo) + (0,) * (r - hi)],
                               out_shape[lo:hi])
        ones = np.ones(out_shape[lo:hi])
        if op == "Add":
            scale, bias = ones, full
        elif op == "Sub":
            scale, bias = (-ones, full) if const_first else (ones, -full)
        elif op == "Mul":
            scale, bias = full, None
        elif const_first:
            x = self.power(x, out, power=-1.0, suffix="reciprocal")
            scale, bias = full, None
        else:
            scale, bias = 1.0 / full, None
        params: dict[str, Any] = {"axis": lo, "num_axes": hi - lo}
        blobs = [scale]
        if bias is not None:
            params["bias_term"] = True
            blobs.append(bias)
        self.set(out, self.emit("Scale", [x], out, out_shape, {"scale_param": params}, blobs))

    def op_Add(self, node: Any) -> None:
        self._binary(node, "Add")

    def op_Sub(self, node: Any) -> None:
        self._binary(node, "Sub")

    def op_Mul(self, node: Any) -> None:
        self._binary(node, "Mul")

    def op_Div(self, node: Any) -> None:
        self._binary(node, "Div")

    def op_Expand(self, node: Any) -> None:
        src = node.input[0]
        s = self.shape(src)
        target = [int(d) for d in self.const(node.input[1], "the target shape").reshape(-1)]
        out = tuple(np.broadcast_shapes(s, tuple(target)))
        if out == s:
            self._alias(node)
            return
        self.lazy[node.output[0]] = _Lazy("expand", out, self.node_label, blob=self.blob(src))

    # ---- normalisation

    def op_BatchNormalization(self, node: Any) -> None:
        a = _attrs(node)
        if a.get("training_mode", 0):
            raise self.refuse("training-mode batch normalisation")
        if any(o and self.consumers.get(o) for o in node.output[1:]):
            raise self.refuse("running statistics outputs are used")
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        gamma, beta, mean, var = (self.const(n, w).astype(np.float32).reshape(-1) for n, w in
                                  zip(node.input[1:5], ("scale", "bias", "mean", "variance")))
        if len(s) < 2 or any(v.size != s[1] for v in (gamma, beta, mean, var)):
            raise self.refuse(f"batch normalisation parameters do not match channel axis 1 of {list(s)}")
        eps = a.get("epsilon", 1e-5)
        out = node.output[0]
        bn = self.emit("BatchNorm", [x], out, s, {"batch_norm_param": {"use_global_stats": True, "eps": _f32(eps)}},
                       [mean, var, np.ones(1, np.float32)], suffix="bn")
        self.set(out, self.emit("Scale", [bn], out, s, {"scale_param": {"axis": 1, "bias_term": True}},
                                [gamma, beta]))

    def op_InstanceNormalization(self, node: Any) -> None:
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        if len(s) not in (3, 4):
            raise self.refuse(f"instance normalisation of a rank-{len(s)} tensor")
        gamma = self.const(node.input[1], "scale").astype(np.float32).reshape(-1)
        beta = self.const(node.input[2], "bias").astype(np.float32).reshape(-1)
        eps = float(_attrs(node).get("epsilon", 1e-5))
        out = node.output[0]
        n, c = s[0], s[1]
        x4 = self.view(x, s if len(s) == 4 else (n, c, s[2], 1))
        s4 = self.net.shapes[x4]
        # (x - mean) / sqrt(var + eps): Caffe's MVN would divide by sqrt(var) + eps instead, so only its
        # mean subtraction is used and the variance is computed explicitly.
        cen = self.emit("MVN", [x4], out, s4, {"mvn_param": {"normalize_variance": False}}, suffix="center")
        sq = self.emit("Eltwise", [cen, cen], out, s4, {"eltwise_param": {"operation": "PROD"}}, suffix="square")
        var = self.emit("Pooling", [sq], out, (n, c, 1, 1), {"pooling_param": {"pool": "AVE",
                                                                               "global_pooling": True}},
                        suffix="variance")
        inv = self.power(var, out, power=-0.5, shift=eps, suffix="rstd")
        inv2 = self.view(inv, (n, c))
        nrm = self.emit("Scale", [cen, inv2], out, s4, {"scale_param": {"axis": 0}}, suffix="normalize")
        y = self.emit("Scale", [nrm], out, s4, {"scale_param": {"axis": 1, "bias_term": True}}, [gamma, beta],
                      suffix="" if len(s) == 4 else "affine")
        self.set(out, self.view(y, s))

    # ---- convolution, pooling, fully connected

    def _pads(self, a: dict[str, Any], spatial: tuple[int, ...], kernel: list[int], strides: list[int],
              dilations: list[int]) -> list[int]:
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("NOTSET", ""):
            pads = list(a.get("pads", [0] * 4))
        elif auto == "VALID":
            pads = [0] * 4
        else:
            pads = []
            for d, k, st, dl in zip(spatial, kernel, strides, dilations):
                o = -(-d // st)
                total = max(0, (o - 1) * st + (k - 1) * dl + 1 - d)
                small, big = total // 2, total - total // 2
                pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
            pads = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]  # type: ignore[index]
        if pads[0] != pads[2] or pads[1] != pads[3]:
            raise self.refuse(f"asymmetric padding {pads} (Caffe pads both sides equally)")
        return [pads[0], pads[1]]

    def op_Conv(self, node: Any) -> None:
        a = _attrs(node)
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        w = self.const(node.input[1], "the weights").astype(np.float32)
        if len(s) != 4 or w.ndim != 4:
            raise self.refuse(f"only 2-D convolutions map to Caffe here (input {list(s)})")
        bias = self.const(node.input[2], "the bias").astype(np.float32).reshape(-1) \
            if len(node.input) > 2 and node.input[2] else None
        group = int(a.get("group", 1))
        o, ig, kh, kw = w.shape
        if ig * group != s[1] or o % group:
            raise StageFailed(f"{self.node_label}: weights {list(w.shape)} do not fit input {list(s)} with group {group}")
        strides = list(a.get("strides", [1, 1]))
        dil = list(a.get("dilations", [1, 1]))
        ph, pw = self._pads(a, s[2:], [kh, kw], strides, dil)
        oh = (s[2] + 2 * ph - dil[0] * (kh - 1) - 1) // strides[0] + 1
        ow = (s[3] + 2 * pw - dil[1] * (kw - 1) - 1) // strides[1] + 1
        p: dict[str, Any] = {"num_output": o}
        if bias is None:
            p["bias_term"] = False
        _hw(p, "pad", ph, pw, 0, repeated=True)
        _hw(p, "kernel", kh, kw, None, repeated=True)
        _hw(p, "stride", strides[0], strides[1], 1, repeated=True)
        if dil != [1, 1]:
            p["dilation"] = [dil[0]] if dil[0] == dil[1] else dil
        if group != 1:
            p["group"] = group
        blobs = [w] + ([bias] if bias is not None else [])
        self.set(node.output[0], self.emit("Convolution", [x], node.output[0], (s[0], o, oh, ow),
                                           {"convolution_param": p}, blobs))

    def op_ConvTranspose(self, node: Any) -> None:
        raise self.refuse("transposed convolution is not supported by this converter")

    def _pool(self, node: Any, method: str) -> None:
        a = _attrs(node)
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        if len(s) != 4:
            raise self.refuse(f"only 2-D pooling maps to Caffe (input {list(s)})")
        if any(o and self.consumers.get(o) for o in node.output[1:]):
            raise self.refuse("max-pooling indices are used")
        k = list(a["kernel_shape"])
        st = list(a.get("strides", [1, 1]))
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise self.refuse("dilated pooling")
        ceil = bool(a.get("ceil_mode", 0))
        pads = self._pads(a, s[2:], k, st, [1, 1])
        if method == "AVE" and any(pads) and not a.get("count_include_pad", 0):
            raise self.refuse("average pooling that excludes the padding from the divisor (count_include_pad=0); "
                              "Caffe always counts it")
        if any(p >= kk for p, kk in zip(pads, k)):
            raise self.refuse(f"padding {pads} not smaller than the kernel {k}")
        want = tuple(_torch_pool_size(d, kk, ss, p, ceil) for d, kk, ss, p in zip(s[2:], k, st, pads))
        caffe_ceil = True if self.dialect == "bvlc" else ceil
        got = tuple(caffe_pool_size(d, kk, ss, p, caffe_ceil, any(pads)) for d, kk, ss, p in zip(s[2:], k, st, pads))
        if any(g < w for g, w in zip(got, want)):
            raise self.refuse(f"Caffe would give a {list(got)} pooling output where ONNX gives {list(want)}")
        out = node.output[0]
        if tuple(k) == tuple(s[2:]) and not any(pads) and want == (1, 1):
            p: dict[str, Any] = {"pool": method, "global_pooling": True}
        else:
            p = {"pool": method}
            _hw(p, "kernel", k[0], k[1], None)
            _hw(p, "stride", st[0], st[1], 1)
            _hw(p, "pad", pads[0], pads[1], 0)
            if self.dialect == "ceil_mode":
                p["ceil_mode"] = ceil
        trim = got != want
        y = self.emit("Pooling", [x], out, (s[0], s[1]) + got, {"pooling_param": p}, suffix="pool" if trim else "")
        for axis in (2, 3):
            have, keep = self.net.shapes[y][axis], want[axis - 2]
            if have > keep:  # Caffe's extra last row/column: slice it off (its windows start where PyTorch's do)
                last = axis == 3 or got[1] == want[1]
                shape = list(self.net.shapes[y])
                rest = list(shape)
                shape[axis], rest[axis] = keep, have - keep
                name = out if last else f"{out}/crop_h"
                tops = self.net.add("Slice", self.lname(f"crop_{'hw'[axis - 2]}"), [y],
                                    [(name, tuple(shape)), (f"{out}/{'hw'[axis - 2]}_ceil_extra", tuple(rest))],
                                    {"slice_param": {"axis": axis, "slice_point": [keep]}}, top_is_onnx=last)
                y = tops[0]
        self.set(out, y)

    def op_MaxPool(self, node: Any) -> None:
        if _attrs(node).get("storage_order", 0):
            raise self.refuse("column-major max-pooling indices")
        self._pool(node, "MAX")

    def op_AveragePool(self, node: Any) -> None:
        self._pool(node, "AVE")

    def _global_pool(self, node: Any, method: str) -> None:
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        if len(s) not in (3, 4):
            raise self.refuse(f"global pooling of a rank-{len(s)} tensor")
        x4 = self.view(x, s if len(s) == 4 else (s[0], s[1], s[2], 1))
        y = self.emit("Pooling", [x4], node.output[0], (s[0], s[1], 1, 1),
                      {"pooling_param": {"pool": method, "global_pooling": True}},
                      suffix="" if len(s) == 4 else "pool")
        self.output_view(node.output[0], y, s[:2] + (1,) * (len(s) - 2))

    def op_GlobalAveragePool(self, node: Any) -> None:
        self._global_pool(node, "AVE")

    def op_GlobalMaxPool(self, node: Any) -> None:
        self._global_pool(node, "MAX")

    def _reduce(self, node: Any, method: str) -> None:
        a = _attrs(node)
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        r = len(s)
        axes = self._axes(node)
        if axes is None or not axes:
            if a.get("noop_with_empty_axes", 0):
                self.set(node.output[0], x)
                return
            axes = list(range(r))
        ax = sorted({_norm_axis(v, r) for v in axes})
        if ax != list(range(ax[0], ax[-1] + 1)):
            raise self.refuse(f"reduction over non-adjacent axes {ax}")
        if ax[0] == 0:
            raise self.refuse("reduction over the batch axis")
        keep = a.get("keepdims", 1)
        out_shape = tuple(1 if i in ax else d for i, d in enumerate(s)) if keep else \
            tuple(d for i, d in enumerate(s) if i not in ax)
        lo, hi = ax[0], ax[-1] + 1
        red = math.prod(s[lo:hi])
        out = node.output[0]
        last = method != "SUM"
        if r == 4 and ax == [2, 3]:
            y = self.emit("Pooling", [x], out, (s[0], s[1], 1, 1),
                          {"pooling_param": {"pool": method if method != "SUM" else "AVE", "global_pooling": True}},
                          suffix="" if last and keep else "pool")
        else:
            v = self.view(x, (s[0], math.prod(s[1:lo]), red, math.prod(s[hi:])))
            vs = self.net.shapes[v]
            y = self.emit("Pooling", [v], out, (vs[0], vs[1], 1, vs[3]),
                          {"pooling_param": {"pool": method if method != "SUM" else "AVE", "kernel_h": red,
                                             "kernel_w": 1}}, suffix="pool")
        if method == "SUM":  # a mean times the count: one extra rounding
            y = self.power(y, out, scale=float(red), suffix="" if keep and r == 4 and ax == [2, 3] else "sum")
        self.output_view(out, y, out_shape)

    def op_ReduceMean(self, node: Any) -> None:
        self._reduce(node, "AVE")

    def op_ReduceMax(self, node: Any) -> None:
        self._reduce(node, "MAX")

    def op_ReduceSum(self, node: Any) -> None:
        self._reduce(node, "SUM")

    def op_Gemm(self, node: Any) -> None:
        a = _attrs(node)
        if a.get("transA", 0):
            raise self.refuse("Gemm with a transposed computed input")
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        w = self.const(node.input[1], "the weights").astype(np.float64)
        if len(s) != 2 or w.ndim != 2:
            raise self.refuse(f"Gemm of a rank-{len(s)} input")
        w = w if a.get("transB", 0) else w.T
        w = w * a.get("alpha", 1.0)
        n = w.shape[0]
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = self.const(node.input[2], "the bias").astype(np.float64)
            if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
                raise self.refuse(f"a Gemm bias of shape {list(c.shape)} that is not per output")
            bias = np.broadcast_to(c.reshape(-1), (n,)) * a.get("beta", 1.0)
        self._inner_product(x, node.output[0], w, bias, axis=1)

    def _inner_product(self, x: str, out: str, w: np.ndarray, bias: Optional[np.ndarray], axis: int,
                       suffix: str = "") -> str:
        s = self.net.shapes[x]
        p: dict[str, Any] = {"num_output": int(w.shape[0])}
        if bias is None:
            p["bias_term"] = False
        if axis != 1:
            p["axis"] = axis
        blobs = [w.astype(np.float32)] + ([np.asarray(bias, np.float32)] if bias is not None else [])
        y = self.emit("InnerProduct", [x], out, s[:axis] + (int(w.shape[0]),), {"inner_product_param": p}, blobs,
                      suffix=suffix)
        if not suffix:
            self.set(out, y)
        return y

    def op_MatMul(self, node: Any) -> None:
        a, b = node.input[0], node.input[1]
        out = node.output[0]
        if a in self.consts:
            raise self.refuse("a constant times a computed tensor (MatMul with a constant left operand)")
        if b in self.consts:
            w = self.consts[b]
            x = self.blob(a)
            s = self.net.shapes[x]
            if w.ndim != 2 or len(s) < 2:
                raise self.refuse(f"MatMul of {list(s)} by a constant of shape {list(w.shape)}")
            self._inner_product(x, out, w.astype(np.float32).T, None, axis=len(s) - 1)
            return
        la = self.lazy.get(a)
        if la is not None and la.kind == "matmul":
            # (P @ Q) * c @ R  ==  P @ ((Q @ R) * c): the [M, N] intermediate never exists
            r = self.blob(b)
            qr = self._matmul(la.right, r, out, "reassoc_qr")
            if qr is None:
                raise self.refuse(f"the reassociated product {list(self.net.shapes[la.right])} x "
                                  f"{list(self.net.shapes[r])} has no Caffe form")
            if la.scale != 1.0:
                qr = self.power(qr, out, scale=la.scale, suffix="reassoc_scale")
            y = self._matmul(la.left, qr, out, "")
            if y is None:
                raise self.refuse("the reassociated product has no Caffe form")
            self.set(out, y)
            return
        xa, xb = self.blob(a), self.blob(b)
        y = self._matmul(xa, xb, out, "")
        if y is not None:
            self.set(out, y)
            return
        sa, sb = self.net.shapes[xa], self.net.shapes[xb]
        if len(sa) >= 2 and sa[-1] == 1 and self._reassociable(out):
            self.lazy[out] = _Lazy("matmul", tuple(sa[:-1]) + (sb[-1],), self.node_label, left=xa, right=xb)
            return
        raise self.refuse(f"a product of two computed tensors {list(sa)} x {list(sb)} (Caffe has no batched "
                          "matrix product; only dot products and per-row scalings map to stock layers)")

    def _reassociable(self, name: str) -> bool:
        """``name`` flows, through at most scalings by constants, into the left operand of one MatMul."""
        seen = 0
        while seen < 4:
            cons = [n for n in self.consumers.get(name, []) if n.op_type not in ("Shape", "Size")]
            if len(cons) != 1:
                return False
            n = cons[0]
            if n.op_type == "MatMul":
                return n.input[0] == name
            if n.op_type in ("Mul", "Div"):
                other = n.input[1] if n.input[0] == name else n.input[0]
                if other not in self.will_be_const or (n.op_type == "Div" and n.input[1] != other):
                    return False
                name = n.output[0]
                seen += 1
                continue
            return False
        return False

    def _matmul(self, xa: str, xb: str, out: str, suffix: str) -> Optional[str]:
        """Blob of xa @ xb (both computed) when it has an exact stock-Caffe form, else None."""
        sa, sb = self.net.shapes[xa], self.net.shapes[xb]
        if len(sa) < 2 or len(sb) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
            return None
        batch = sa[:-2]
        bn = math.prod(batch)
        m, k, n = sa[-2], sa[-1], sb[-1]
        out_shape = batch + (m, n)
        sfx = (lambda t: f"{suffix}_{t}" if suffix else t)
        if m == 1 and n == 1:  # dot product per batch entry: elementwise product, then a sum by ones
            va, vb = self.view(xa, (bn, k)), self.view(xb, (bn, k))
            prod = self.emit("Eltwise", [va, vb], out, (bn, k), {"eltwise_param": {"operation": "PROD"}},
                             suffix=sfx("dot_prod"))
            y = self._inner_product(prod, out, np.ones((1, k), np.float32), None, axis=1, suffix=sfx("dot_sum"))
            return self.view(y, out_shape)
        if k == 1 and (n == 1 or m == 1):  # a vector times a per-batch scalar
            vec, sca, length = (xa, xb, m) if n == 1 else (xb, xa, n)
            v = self.view(vec, (bn, 1, length))
            sc = self.view(sca, (bn, 1))
            y = self.emit("Scale", [v, sc], out, (bn, 1, length), {"scale_param": {"axis": 0}},
                          suffix=sfx("scale"))
            return self.view(y, out_shape)
        return None

    def op_Concat(self, node: Any) -> None:
        xs = [self.blob(i) for i in node.input]
        shapes = [self.net.shapes[x] for x in xs]
        r = len(shapes[0])
        axis = _norm_axis(_attrs(node)["axis"], r)
        out_shape = list(shapes[0])
        out_shape[axis] = sum(s[axis] for s in shapes)
        if len(xs) == 1:
            self.set(node.output[0], xs[0])
            return
        self.set(node.output[0], self.emit("Concat", xs, node.output[0], tuple(out_shape),
                                           {"concat_param": {"axis": axis}}))

    def _slice_parts(self, x: str, axis: int, points: list[int], outs: list[Optional[str]]) -> list[str]:
        """Caffe Slice of ``x`` at ``points`` along ``axis``; ``outs`` names the ONNX tensor of each part."""
        s = self.net.shapes[x]
        bounds = [0] + points + [s[axis]]
        tops = []
        for i, o in enumerate(outs):
            shp = list(s)
            shp[axis] = bounds[i + 1] - bounds[i]
            tops.append((o if o else self.net.unique_blob(f"{self.node.output[0]}/part{i}"), tuple(shp)))
        name = self.lname() if all(outs) else self.lname(f"slice{axis}")
        return self.net.add("Slice", name, [x], tops, {"slice_param": {"axis": axis, "slice_point": points}},
                            top_is_onnx=True)

    def op_Split(self, node: Any) -> None:
        a = _attrs(node)
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        axis = _norm_axis(a.get("axis", 0), len(s))
        n = len(node.output)
        if "split" in a:
            sizes = list(a["split"])
        elif len(node.input) > 1 and node.input[1]:
            sizes = [int(v) for v in self.const(node.input[1], "the split sizes").reshape(-1)]
        else:
            step = -(-s[axis] // n)
            sizes = [min(step, s[axis] - i * step) for i in range(n)]
        if n == 1:
            self.set(node.output[0], x)
            return
        points = list(np.cumsum(sizes[:-1]).astype(int))
        tops = self._slice_parts(x, axis, [int(p) for p in points], list(node.output))
        for o, t in zip(node.output, tops):
            self.set(o, t)

    def _take(self, x: str, axis: int, start: int, end: int, out: Optional[str]) -> str:
        """Elements [start, end) of ``x`` along ``axis`` (the rest goes to Silence)."""
        s = self.net.shapes[x]
        if start == 0 and end == s[axis]:
            return x
        points = [p for p in (start, end) if 0 < p < s[axis]]
        outs: list[Optional[str]] = [None] * (len(points) + 1)
        outs[1 if start > 0 else 0] = out
        tops = self._slice_parts(x, axis, points, outs)
        return tops[1 if start > 0 else 0]

    def op_Slice(self, node: Any) -> None:
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        r = len(s)
        if self.opset < 10:
            a = _attrs(node)
            starts, ends = list(a["starts"]), list(a["ends"])
            axes = list(a.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts = [int(v) for v in self.const(node.input[1], "starts").reshape(-1)]
            ends = [int(v) for v in self.const(node.input[2], "ends").reshape(-1)]
            axes = [int(v) for v in self.const(node.input[3], "axes").reshape(-1)] \
                if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
            steps = [int(v) for v in self.const(node.input[4], "steps").reshape(-1)] \
                if len(node.input) > 4 and node.input[4] else [1] * len(starts)
        cuts = []
        for st, en, ax, sp in zip(starts, ends, axes, steps):
            ax = _norm_axis(ax, r)
            b, e, step = slice(st, en, sp).indices(s[ax])
            if step != 1:
                raise self.refuse(f"strided slicing (step {sp})")
            if e <= b:
                raise self.refuse("an empty slice")
            if (b, e) != (0, s[ax]):
                cuts.append((ax, b, e))
        if not cuts:
            self.set(node.output[0], x)
            return
        for i, (ax, b, e) in enumerate(cuts):
            x = self._take(x, ax, b, e, node.output[0] if i == len(cuts) - 1 else None)
        self.set(node.output[0], x)

    def op_Gather(self, node: Any) -> None:
        x = self.blob(node.input[0])
        s = self.net.shapes[x]
        axis = _norm_axis(_attrs(node).get("axis", 0), len(s))
        idx = self.const(node.input[1], "the indices").astype(np.int64)
        if idx.ndim > 1:
            raise self.refuse("gathering with multi-dimensional indices")
        flat = [int(i) + s[axis] if i < 0 else int(i) for i in idx.reshape(-1)]
        if not flat or flat != list(range(flat[0], flat[0] + len(flat))):
            raise self.refuse(f"gathering non-contiguous indices {flat}")
        if axis == 0 and s[0] != 1:
            raise self.refuse("gathering along the batch axis")
        y = self._take(x, axis, flat[0], flat[-1] + 1, None if idx.ndim == 0 else node.output[0])
        out_shape = list(s)
        if idx.ndim == 0:
            del out_shape[axis]
        else:
            out_shape[axis] = len(flat)
        self.output_view(node.output[0], y, tuple(out_shape))


# ----------------------------------------------------------------------------------------- shape helpers


def _torch_pool_size(d: int, k: int, s: int, p: int, ceil: bool) -> int:
    """Output size of PyTorch/ONNX pooling (ceil windows must start inside the input or left padding)."""
    n = d + 2 * p - k
    o = (-(-n // s) if ceil else n // s) + 1
    if ceil and (o - 1) * s >= d + p:
        o -= 1
    return o


def caffe_pool_size(d: int, k: int, s: int, p: int, ceil: bool, any_pad: bool) -> int:
    """Output size as Caffe's PoolingLayer::Reshape computes it (float division, then ceil or floor), including
    its clip of a last window that would start in the padding, applied when either pad is non-zero (``any_pad``).
    The one definition: the converter and the Caffe graph patches both use it."""
    q = np.float32(d + 2 * p - k) / np.float32(s)
    o = int(math.ceil(q) if ceil else math.floor(q)) + 1
    if any_pad and (o - 1) * s >= d + p:
        o -= 1
    return o


def _span(small: tuple[int, ...], full: tuple[int, ...], allow_inner_ones: bool = False) -> Optional[tuple[int, int]]:
    """The axes [lo, hi) over which ``small`` (same rank as ``full``) is not broadcast, if contiguous."""
    varying = [i for i, (a, b) in enumerate(zip(small, full)) if a != 1]
    if any(small[i] != full[i] for i in varying):
        return None
    if not varying:
        return None
    lo, hi = varying[0], varying[-1] + 1
    for i in range(lo, hi):
        if small[i] != full[i] and not (allow_inner_ones and small[i] == 1):
            return None
    return lo, hi


def _hw(p: dict[str, Any], key: str, h: int, w: int, default: Optional[int], repeated: bool = False) -> None:
    """Set ``key`` (equal h, w) or ``key_h``/``key_w``; skip the default. Convolution spells kernel_size."""
    name = "kernel_size" if key == "kernel" else key
    if h == w:
        if h != default:
            p[name] = [h] if repeated else h
    else:
        p[f"{key}_h"], p[f"{key}_w"] = h, w


# --------------------------------------------------------------------------------------- clean-up passes


def _finish(net: _Net, out_blob: str) -> None:
    """Name the output, fuse trivial chains, drop dead layers, silence unused Slice parts."""
    layers = net.layers
    if out_blob == "input":
        top = net.add("Power", "output", ["input"], [("output", net.shapes["input"])], {"power_param": {}})
        out_blob = top[0]
    _rename_blob(net, out_blob, "output")
    for _ in range(len(layers) + 1):
        changed = _dce(net) | _fuse_views(net) | _fuse_power(net) | _fuse_scale(net)
        if not changed:
            break
    for layer in net.layers:
        if layer.type in ("Reshape", "Flatten"):
            t, p = _view_params(net.shapes[layer.bottom[0]], net.shapes[layer.top[0]])
            layer.type, layer.params = t, p
    producer = next(l for l in net.layers if "output" in l.top)
    if len(producer.top) > 1:
        # OpenCV addresses outputs by layer name (its first top): give "output" a layer of its own
        pre = net.unique_blob("output/pre", allow_reserved=True)
        _rename_blob(net, "output", pre)
        t, p = _view_params(net.shapes[pre], net.shapes[pre])
        net.layers.insert(net.layers.index(producer) + 1, Layer("output", t, [pre], ["output"], p))
        net.shapes["output"] = net.shapes[pre]
        producer = net.layers[net.layers.index(producer) + 1]
    if producer.name != "output" and producer.type != "Input":
        _rename_layer(net, producer, "output")
    used = {b for l in net.layers for b in l.bottom}
    extra: list[Layer] = []
    for layer in net.layers:
        extra.append(layer)
        dangling = [t for t in layer.top if t not in used and t != "output"]
        if dangling:
            extra.append(Layer(_free_layer_name(net, layer.name + "/silence"), "Silence", dangling, []))
    net.layers[:] = extra


def _free_layer_name(net: _Net, base: str) -> str:
    names = {l.name for l in net.layers}
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    return name


def _rename_layer(net: _Net, layer: Layer, new: str) -> None:
    for other in net.layers:
        if other.name == new:
            other.name = _free_layer_name(net, new + "_")
    layer.name = new


def _rename_blob(net: _Net, old: str, new: str) -> None:
    if old == new:
        return
    if new in net.shapes:
        _rename_blob(net, new, net.unique_blob(new + "_"))
    for l in net.layers:
        l.bottom = [new if b == old else b for b in l.bottom]
        l.top = [new if t == old else t for t in l.top]
    net.shapes[new] = net.shapes.pop(old)


def _uses(net: _Net) -> dict[str, list[Layer]]:
    u: dict[str, list[Layer]] = {}
    for l in net.layers:
        for b in l.bottom:
            u.setdefault(b, []).append(l)
    return u


def _dce(net: _Net) -> bool:
    needed = {"output"}
    keep = []
    for l in reversed(net.layers):
        if l.type == "Input" or any(t in needed for t in l.top):
            keep.append(l)
            needed.update(l.bottom)
    keep.reverse()
    changed = len(keep) != len(net.layers)
    net.layers[:] = keep
    return changed


def _producer(net: _Net) -> dict[str, Layer]:
    return {t: l for l in net.layers for t in l.top}


def _fuse_views(net: _Net) -> bool:
    """Reshape of a Reshape -> one Reshape; a Reshape to the same shape -> nothing."""
    uses, prod = _uses(net), _producer(net)
    for l in net.layers:
        if l.type != "Reshape":
            continue
        src = l.bottom[0]
        p = prod.get(src)
        if p is not None and p.type == "Reshape" and len(uses.get(src, [])) == 1 and src != "output":
            l.bottom = [p.bottom[0]]
            return True
        if net.shapes[src] == net.shapes[l.top[0]] and l.top[0] != "output":
            top = l.top[0]
            for other in net.layers:
                other.bottom = [src if b == top else b for b in other.bottom]
            return True
    return False


def _fuse_power(net: _Net) -> bool:
    """Power(power=1) followed by Power -> one Power (an affine map composed into the next)."""
    uses, prod = _uses(net), _producer(net)
    for l in net.layers:
        if l.type != "Power":
            continue
        src = l.bottom[0]
        p = prod.get(src)
        if p is None or p.type != "Power" or len(uses.get(src, [])) != 1 or src == "output":
            continue
        a, b = p.params["power_param"], l.params["power_param"]
        if a.get("power", 1.0) != 1.0:
            continue
        s1, h1 = a.get("scale", 1.0), a.get("shift", 0.0)
        s2, h2 = b.get("scale", 1.0), b.get("shift", 0.0)
        merged = {k: v for k, v in (("power", b.get("power", 1.0)), ("scale", _f32(s1 * s2)),
                                    ("shift", _f32(h1 * s2 + h2))) if v != (1.0 if k != "shift" else 0.0)}
        l.params = {"power_param": merged}
        l.bottom = [p.bottom[0]]
        return True
    return False


def _fuse_scale(net: _Net) -> bool:
    """Two constant Scale layers on the same axes -> one (x*s1 + b1)*s2 + b2 = x*(s1 s2) + (b1 s2 + b2)."""
    uses, prod = _uses(net), _producer(net)
    for l in net.layers:
        if l.type != "Scale" or len(l.bottom) != 1:
            continue
        src = l.bottom[0]
        p = prod.get(src)
        if p is None or p.type != "Scale" or len(p.bottom) != 1 or len(uses.get(src, [])) != 1 or src == "output":
            continue
        pa, pb = p.params["scale_param"], l.params["scale_param"]
        if (pa.get("axis", 1), pa.get("num_axes", 1)) != (pb.get("axis", 1), pb.get("num_axes", 1)):
            continue
        s1 = p.blobs[0].astype(np.float64)
        b1 = p.blobs[1].astype(np.float64) if pa.get("bias_term") else np.zeros_like(s1)
        s2 = l.blobs[0].astype(np.float64)
        b2 = l.blobs[1].astype(np.float64) if pb.get("bias_term") else np.zeros_like(s2)
        if s1.shape != s2.shape:
            continue
        params = dict(pb)
        params["bias_term"] = True
        l.params = {"scale_param": params}
        l.blobs = [(s1 * s2).astype(np.float32), (b1 * s2 + b2).astype(np.float32)]
        l.bottom = [p.bottom[0]]
        return True
    return False


# --------------------------------------------------------------------------------------------- emission


def _fill(msg: Any, values: dict[str, Any]) -> None:
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


def to_messages(net: _Net, dialect: str, name: str) -> tuple[Any, Any]:
    """(prototxt NetParameter, caffemodel NetParameter) of a converted net."""
    proto = prototxt_message(net, dialect, name)
    weights = schema.new_net(dialect)
    weights.name = name
    for layer in net.layers:
        if layer.blobs:
            _weights_layer(weights, layer)
    return proto, weights


def prototxt_message(net: _Net, dialect: str, name: str) -> Any:
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
    lw = weights.layer.add(name=layer.name, type=layer.type)
    for arr in layer.blobs:
        schema.fill_blob(lw.blobs.add(), arr)


def caffemodel_bytes(net: _Net, dialect: str, name: str, consume: bool = False) -> bytes:
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


def build_net(model: Any, dialect: str, input_shape: tuple[int, int, int, int]) -> _Net:
    """The converted net (layers and blob shapes) before serialization."""
    return _Converter(model, dialect, input_shape).run()  # reads the model, never modifies it


@dataclass(frozen=True)
class Conversion:
    prototxt: str
    caffemodel: bytes
    layer_types: dict[str, int]  # Caffe layer type -> count, sorted by type
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

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


def _conversion(net: _Net, dialect: str, input_shape: tuple[int, int, int, int], name: str) -> Conversion:
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
