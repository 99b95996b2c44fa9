"""The graph walk: ONNX nodes in order, constants folded, every other node handed to its op handler.

The :class:`Converter` holds what the handlers share (constants, the ONNX tensor -> Caffe blob map, lazy
values, the net under construction) and the small building blocks they are written with (``emit``,
``power``, ``view``...). The handlers themselves live by op family in the ``*_ops`` modules and are passed
in as a table, so this module knows no op but the ones folding resolves (Constant, Shape, Size).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from ...errors import NotExpressible, StageFailed
from .. import schema
from ..shapes import Shape
from .net import Layer, Lazy, Net, Params, attrs, f32, fold
from .passes import finish

Handler = Callable[["Converter", Any], None]  # (converter, ONNX node) -> binds the node's outputs


class Converter:
    """One conversion of one ONNX model to one Caffe dialect at one input shape."""

    def __init__(self, model: Any, dialect: str, input_shape: tuple[int, int, int, int],
                 handlers: dict[str, Handler]) -> None:
        if dialect not in schema.DIALECTS:
            raise StageFailed(f"unknown Caffe dialect {dialect!r} (expected one of {', '.join(schema.DIALECTS)})")
        self.model = model
        self.dialect = dialect
        self.handlers = handlers
        self.input_shape: Shape = tuple(int(d) for d in input_shape)
        self.opset: int = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if not self.opset:
            raise StageFailed("the ONNX model imports no default-domain opset")
        g = model.graph
        from onnx import numpy_helper

        self.consts: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in g.initializer}
        self.vals: dict[str, str] = {}  # ONNX tensor -> Caffe blob
        self.lazy: dict[str, Lazy] = {}
        self.net = Net({o for n in g.node for o in n.output})
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

    # ---- errors and lookups

    def refuse(self, why: str) -> NotExpressible:
        """The error for the current node: no faithful Caffe equivalent in this dialect, and why."""
        return NotExpressible(f"layer {self.node_label} of op {self.node.op_type} is not expressible in Caffe "
                              f"dialect {self.dialect}: {why}")

    def shape(self, name: str) -> Shape:
        """The shape of an ONNX tensor, whatever it currently is (constant, lazy value or blob)."""
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
        """The value of a tensor that must be constant (``what`` names it in the refusal)."""
        if name not in self.consts:
            raise self.refuse(f"{what} ({name!r}) must be a constant")
        return self.consts[name]

    def scalar(self, name: str, what: str) -> float:
        """A constant that must hold a single value."""
        c = self.const(name, what)
        if c.size != 1:
            raise self.refuse(f"{what} must be a single value, got shape {list(c.shape)}")
        return float(c.reshape(-1)[0])

    def axes(self, node: Any, index: int = 1) -> Optional[list[int]]:
        """The ``axes`` of a node: its attribute (old opsets) or its constant input ``index`` (new ones)."""
        a = attrs(node)
        if "axes" in a:
            return [int(x) for x in a["axes"]]
        if len(node.input) > index and node.input[index]:
            return [int(x) for x in self.const(node.input[index], "axes").reshape(-1)]
        return None

    # ---- building blocks

    def lname(self, suffix: str = "") -> str:
        """The layer name for the current node (plus ``/suffix`` for a helper layer)."""
        return self.node_label + (f"/{suffix}" if suffix else "")

    def emit(self, type_: str, bottom: list[str], out: str, shape: Shape, params: Optional[Params] = None,
             blobs: Optional[list[np.ndarray]] = None, suffix: str = "") -> str:
        """One layer whose top is the ONNX tensor ``out`` (or a helper blob named after it when ``suffix``)."""
        if suffix:
            return self.net.add(type_, self.lname(suffix), bottom, [(f"{out}/{suffix}", shape)], params, blobs)[0]
        return self.net.add(type_, self.lname(), bottom, [(out, shape)], params, blobs, top_is_onnx=True)[0]

    def set(self, onnx_name: str, blob: str) -> None:
        """Bind an ONNX tensor to the Caffe blob holding its value."""
        self.vals[onnx_name] = blob

    def view(self, blob: str, shape: Shape) -> str:
        """``blob`` reinterpreted with ``shape`` (a helper Reshape named after the current node)."""
        return self.net.view(blob, shape, self.lname())

    def output_view(self, out: str, blob: str, shape: Shape) -> None:
        """Bind ONNX output ``out`` to ``blob`` viewed with ``shape``."""
        self.set(out, self.view(blob, shape))

    def power(self, blob: str, out: str, *, power: float = 1.0, scale: float = 1.0, shift: float = 0.0,
              suffix: str = "") -> str:
        """A Power layer, (shift + scale * x) ** power, writing only the non-default fields."""
        p: dict[str, Any] = {}
        if power != 1.0:
            p["power"] = f32(power)
        if scale != 1.0:
            p["scale"] = f32(scale)
        if shift != 0.0:
            p["shift"] = f32(shift)
        return self.emit("Power", [blob], out, self.net.shapes[blob], {"power_param": p}, suffix=suffix)

    def alias(self, node: Any) -> None:
        """The node's output is its first input (Identity, inference Dropout, float Cast, no-op Expand)."""
        src = node.input[0]
        if src in self.lazy:
            self.lazy[node.output[0]] = self.lazy[src]
        else:
            self.set(node.output[0], self.blob(src))

    def reshape_to(self, node: Any, shape: Shape) -> None:
        """The node's output is its first input with ``shape``; the Reshape layer carries the node's name."""
        src = node.input[0]
        if src in self.lazy:
            raise self.refuse("reshaping a broadcast or an unmaterialised product")
        self.set(node.output[0], self.net.view(self.blob(src), shape, self.lname(), top=node.output[0]))

    # ---- driver

    def run(self) -> Net:
        """Convert the whole graph; returns the cleaned-up net whose output blob is ``output``."""
        g = self.model.graph
        self._bind_input()
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
        finish(self.net, blob)
        return self.net

    def _bind_input(self) -> None:
        """Check the graph's one input against the Caffe input shape and give it the ``input`` Input layer."""
        g = self.model.graph
        inputs = [i for i in g.input if i.name not in self.consts]
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

    def convert_node(self, node: Any) -> None:
        """Fold the node if its inputs are constant (or it reads only shapes), else run its handler."""
        ins = list(node.input)
        present = [i for i in ins if i]
        op = node.op_type
        if op == "Constant" or (present and all(i in self.consts for i in present)) or (not present):
            vals = fold(node, [self.consts.get(i) if i else None for i in ins], self.opset)
            for name, v in zip(node.output, vals):
                if name:
                    self.consts[name] = np.asarray(v)
            return
        if op == "Shape":
            s = np.array(self.shape(ins[0]), dtype=np.int64)
            a = attrs(node)
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
        handler = self.handlers.get(op)
        if handler is None:
            raise self.refuse("no Caffe layer or faithful decomposition for this op")
        handler(self, node)

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
