"""Graph patch ops on ONNX models, the graph check run after every patch, and a diff-friendly listing.

Ops edit a ``ModelProto`` in place through :class:`OnnxGraph`, which holds the node list as plain Python
objects while a patch runs and writes it back at the end. Selection is on the top-level graph only;
tensor renames follow into subgraphs (If/Loop bodies) that read the renamed tensor.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional

import numpy as np

from ..errors import PatchError, StageFailed
from . import spec
from .opctx import OpContext

# --------------------------------------------------------------------------------------------- graph


class OnnxGraph:
    """A model under edit: ``nodes`` is a Python list (cheap inserts/removals), the rest is the proto."""

    def __init__(self, model: Any) -> None:
        import onnx

        self.model = model
        self.graph = model.graph
        self.nodes: list[Any] = []
        for n in model.graph.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            self.nodes.append(c)

    def commit(self) -> Any:
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        return self.model

    # ---- indexes (recomputed on demand: graphs are small, and ops change them)
    @property
    def initializer_names(self) -> set[str]:
        return {t.name for t in self.graph.initializer} | {t.values.name for t in self.graph.sparse_initializer}

    @property
    def input_names(self) -> list[str]:
        init = self.initializer_names
        return [v.name for v in self.graph.input if v.name not in init]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.output]

    def producer(self, tensor: str) -> Optional[Any]:
        for n in self.nodes:
            if tensor in n.output:
                return n
        return None

    def consumers(self, tensor: str) -> list[Any]:
        return [n for n in self.nodes if tensor in n.input or tensor in _subgraph_reads(n)]

    def all_names(self) -> set[str]:
        names: set[str] = set(self.initializer_names)
        names.update(v.name for v in self.graph.input)
        names.update(v.name for v in self.graph.output)
        names.update(v.name for v in self.graph.value_info)
        for n in self.nodes:
            names.update(n.input)
            names.update(n.output)
        names.discard("")
        return names

    def node_names(self) -> set[str]:
        return {n.name for n in self.nodes if n.name}

    def opset(self, domain: str = "") -> int:
        for o in self.model.opset_import:
            if o.domain in (domain, "ai.onnx" if domain == "" else domain):
                return int(o.version)
        return 0

    def index(self, node: Any) -> int:
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise ValueError("node is not in the graph")

    # ---- edits
    def rename_tensor(self, old: str, new: str) -> None:
        """Rename ``old`` everywhere it appears: node inputs/outputs (incl. subgraphs), graph I/O, initializers."""
        for n in self.nodes:
            _rename_in_node(n, old, new)
        for coll in (self.graph.input, self.graph.output, self.graph.value_info):
            for v in coll:
                if v.name == old:
                    v.name = new
        for t in self.graph.initializer:
            if t.name == old:
                t.name = new
        for st in self.graph.sparse_initializer:
            if st.values.name == old:
                st.values.name = new

    def replace_input(self, old: str, new: str, skip: Any = None) -> None:
        """Make every reader of ``old`` (except ``skip``) read ``new``; producers are untouched."""
        for n in self.nodes:
            if n is skip:
                continue
            for i, x in enumerate(n.input):
                if x == old:
                    n.input[i] = new
            for g in _subgraphs(n):
                _rename_reads_in_graph(g, old, new)

    def drop_value_info(self, names: Iterable[str]) -> None:
        names = set(names)
        keep = [v for v in self.graph.value_info if v.name not in names]
        if len(keep) != len(self.graph.value_info):
            _replace_repeated(self.graph.value_info, keep)

    def clear_output_type(self, name: str, keep_elem_type: bool = False) -> None:
        for v in self.graph.output:
            if v.name == name:
                elem = v.type.tensor_type.elem_type
                v.ClearField("type")
                if keep_elem_type and elem:
                    v.type.tensor_type.elem_type = elem

    def prune_unused_constants(self, candidates: Iterable[str]) -> None:
        """Drop initializers / Constant nodes among ``candidates`` that nothing reads any more."""
        used = {x for n in self.nodes for x in list(n.input) + sorted(_subgraph_reads(n))} | set(self.output_names)
        for name in candidates:
            if name in used:
                continue
            inits = [t for t in self.graph.initializer if t.name != name]
            if len(inits) != len(self.graph.initializer):
                _replace_repeated(self.graph.initializer, inits)
                ins = [v for v in self.graph.input if v.name != name]
                if len(ins) != len(self.graph.input):
                    _replace_repeated(self.graph.input, ins)
            self.nodes = [n for n in self.nodes if not (n.op_type == "Constant" and list(n.output) == [name])]
            self.drop_value_info([name])


def _replace_repeated(field: Any, items: list[Any]) -> None:
    copies = []
    for it in items:
        c = type(it)()
        c.CopyFrom(it)
        copies.append(c)
    del field[:]
    field.extend(copies)


def _subgraphs(node: Any) -> list[Any]:
    import onnx

    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _subgraph_reads(node: Any) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    reads: set[str] = set()
    for g in _subgraphs(node):
        local = {v.name for v in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            local.update(n.output)
        for n in g.node:
            reads.update(x for x in n.input if x and x not in local)
            reads.update(_subgraph_reads(n) - local)
        reads.update(v.name for v in g.output if v.name not in local)
    return reads


def _rename_reads_in_graph(g: Any, old: str, new: str) -> None:
    for n in g.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
        for sg in _subgraphs(n):
            _rename_reads_in_graph(sg, old, new)
    for v in g.output:
        if v.name == old:
            v.name = new


def _rename_in_node(n: Any, old: str, new: str) -> None:
    for i, x in enumerate(n.input):
        if x == old:
            n.input[i] = new
    for i, x in enumerate(n.output):
        if x == old:
            n.output[i] = new
    for g in _subgraphs(n):
        _rename_reads_in_graph(g, old, new)


# ----------------------------------------------------------------------------------------- selection


def select(g: OnnxGraph, sel: spec.Selector) -> list[Any]:
    """Nodes matching every key of ``sel``, in graph order."""
    rx = re.compile(sel.regex) if sel.regex is not None else None
    outs = set(g.output_names)
    found = []
    for n in g.nodes:
        if sel.name is not None and n.name != sel.name:
            continue
        if sel.type is not None and n.op_type != sel.type:
            continue
        if rx is not None and not rx.fullmatch(n.name):
            continue
        if sel.producer_of is not None and sel.producer_of not in n.output:
            continue
        if sel.consumer_of is not None and sel.consumer_of not in n.input and sel.consumer_of not in _subgraph_reads(n):
            continue
        if sel.last and not outs.intersection(n.output):
            continue
        found.append(n)
    return found


def _label(n: Any) -> str:
    return f"{n.name or '(unnamed)'} [{n.op_type}]"


class _OpCtx(OpContext):
    noun = "node"


def _select_one(g: OnnxGraph, ctx: _OpCtx, sel: spec.Selector) -> Optional[Any]:
    return ctx.one(select(g, sel), sel, _label)


def _select_some(g: OnnxGraph, ctx: _OpCtx, sel: spec.Selector) -> list[Any]:
    return ctx.some(select(g, sel), sel)


def _fresh(g: OnnxGraph, ctx: _OpCtx, name: str, what: str = "tensor") -> None:
    taken = g.all_names() if what == "tensor" else g.node_names()
    if name in taken:
        raise ctx.fail(f"{what} name {name!r} is already used in {ctx.what}")


# --------------------------------------------------------------------------------------------- ops


def _rename_tensor(g: OnnxGraph, ctx: _OpCtx, op: spec.RenameTensor) -> int:
    if op.tensor is not None:
        if op.tensor not in g.all_names():
            if op.optional:
                return 0
            raise ctx.fail(f"tensor {op.tensor!r} does not exist in {ctx.what}; add 'optional: true' to the op "
                           "if that is expected")
        old = op.tensor
    else:
        assert op.select is not None
        n = _select_one(g, ctx, op.select)
        if n is None:
            return 0
        if op.output >= len(n.output) or not n.output[op.output]:
            raise ctx.fail(f"node {_label(n)} has no output {op.output}")
        old = n.output[op.output]
    if old == op.to:
        return 1
    _fresh(g, ctx, op.to)
    g.rename_tensor(old, op.to)
    return 1


def _rename_node(g: OnnxGraph, ctx: _OpCtx, op: spec.RenameNode) -> int:
    n = _select_one(g, ctx, op.select)
    if n is None:
        return 0
    if n.name != op.to:
        _fresh(g, ctx, op.to, "node")
        n.name = op.to
    return 1


def _remove_node(g: OnnxGraph, ctx: _OpCtx, op: spec.RemoveNode) -> int:
    targets = _select_some(g, ctx, op.select)
    for n in targets:
        consts = g.initializer_names | {o for m in g.nodes if m.op_type == "Constant" for o in m.output}
        data = [x for x in n.input if x and x not in consts]
        if len(data) != 1:
            raise ctx.fail(f"node {_label(n)} has {len(data)} data inputs ({', '.join(data) or 'none'}); "
                           "remove_node needs exactly one to re-wire its consumers to")
        u = data[0]
        outs = set(g.output_names)
        used = [o for o in n.output if o and (o in outs or g.consumers(o))]
        if len(used) > 1:
            raise ctx.fail(f"node {_label(n)} has {len(used)} used outputs ({', '.join(used)}); remove_node "
                           "can only re-wire one")
        side = [x for x in n.input if x and x != u]
        del g.nodes[g.index(n)]
        if used:
            v = used[0]
            if v in outs:
                if u in g.input_names or u in g.initializer_names or u in outs:
                    raise ctx.fail(f"node {_label(n)} connects graph input/output {u!r} to graph output {v!r}; "
                                   "removing it would leave nothing between them")
                # keep the graph output's name: the input tensor takes it over
                g.drop_value_info([v])
                g.rename_tensor(u, v)
                g.clear_output_type(v, keep_elem_type=False)
            else:
                g.replace_input(v, u)
                g.drop_value_info([v])
        g.drop_value_info([o for o in n.output if o and o not in outs])
        g.prune_unused_constants(side)
    return len(targets)


def _attr_value(ctx: _OpCtx, name: str, value: Any, existing: Any = None) -> Any:
    """An AttributeProto for ``value``, coerced to the existing attribute's type when there is one."""
    import onnx
    from onnx import helper

    A = onnx.AttributeProto
    if isinstance(value, dict):
        raise ctx.fail(f"attribute {name!r}: a mapping is not a valid ONNX attribute value")
    try:
        if existing is not None:
            t = existing.type
            if t == A.INT:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(f"expected an integer, got {value!r}")
                return helper.make_attribute(name, int(value), attr_type=A.INT)
            if t == A.FLOAT:
                return helper.make_attribute(name, float(value), attr_type=A.FLOAT)
            if t == A.STRING:
                return helper.make_attribute(name, str(value), attr_type=A.STRING)
            vals = value if isinstance(value, list) else [value]
            if t == A.INTS:
                return helper.make_attribute(name, [int(v) for v in vals], attr_type=A.INTS)
            if t == A.FLOATS:
                return helper.make_attribute(name, [float(v) for v in vals], attr_type=A.FLOATS)
            if t == A.STRINGS:
                return helper.make_attribute(name, [str(v) for v in vals], attr_type=A.STRINGS)
            raise ValueError(f"attributes of type {A.AttributeType.Name(t)} cannot be set from a patch")
        if isinstance(value, list) and not value:
            raise ValueError("an empty list has no type; the attribute must already exist to set it empty")
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, list):
            value = [int(v) if isinstance(v, bool) else v for v in value]
        return helper.make_attribute(name, value)
    except (ValueError, TypeError) as exc:
        raise ctx.fail(f"attribute {name!r}: {exc}") from None


def _remove_field(g: OnnxGraph, ctx: _OpCtx, op: spec.RemoveField) -> int:
    found = select(g, op.select)
    having = [n for n in found if any(a.name == op.field for a in n.attribute)]
    if not having and not op.optional:
        if not found:
            raise ctx.no_match(op.select)
        raise ctx.fail(f"select {op.select.describe()} matched {len(found)} node(s) but none has attribute "
                       f"{op.field!r}; add 'optional: true' to the op if that is expected")
    for n in having:
        keep = [a for a in n.attribute if a.name != op.field]
        _replace_repeated(n.attribute, keep)
    return len(having)


def _set_field(g: OnnxGraph, ctx: _OpCtx, op: spec.SetField) -> int:
    if "." in op.field:
        raise ctx.fail(f"field {op.field!r}: ONNX attributes are plain names (dotted paths are for Caffe layers)")
    found = _select_some(g, ctx, op.select)
    for n in found:
        existing = next((a for a in n.attribute if a.name == op.field), None)
        attr = _attr_value(ctx, op.field, op.value, existing)
        if existing is not None:
            existing.CopyFrom(attr)
        else:
            n.attribute.append(attr)
    return len(found)


def _new_node(g: OnnxGraph, ctx: _OpCtx, spec_node: spec.NewNode, inp: str) -> tuple[Any, str]:
    from onnx import helper

    _fresh(g, ctx, spec_node.name, "node")
    out = spec_node.output or spec_node.name
    _fresh(g, ctx, out)
    attrs = [_attr_value(ctx, k, v) for k, v in sorted(spec_node.attributes.items())]
    node = helper.make_node(spec_node.type, [inp], [out], name=spec_node.name, domain=spec_node.domain or None)
    node.attribute.extend(attrs)
    return node, out


def _insert(g: OnnxGraph, ctx: _OpCtx, op: spec.InsertNode) -> int:
    n = _select_one(g, ctx, op.select)
    if n is None:
        return 0
    if op.op == "insert_after":
        if op.output >= len(n.output) or not n.output[op.output]:
            raise ctx.fail(f"node {_label(n)} has no output {op.output}")
        t = n.output[op.output]
        new, out = _new_node(g, ctx, op.node, t)
        g.replace_input(t, out, skip=new)
        if t in g.output_names:  # the graph output moves to the new node
            for v in g.graph.output:
                if v.name == t:
                    v.name = out
                    v.ClearField("type")
        g.nodes.insert(g.index(n) + 1, new)
    else:
        if op.input >= len(n.input) or not n.input[op.input]:
            raise ctx.fail(f"node {_label(n)} has no input {op.input}")
        t = n.input[op.input]
        new, out = _new_node(g, ctx, op.node, t)
        n.input[op.input] = out
        g.nodes.insert(g.index(n), new)
    return 1


def _dim_set(dim: Any, size: Any, dim_param: str) -> None:
    if size == "dynamic":
        dim.ClearField("dim_value")
        dim.dim_param = dim_param
    else:
        dim.ClearField("dim_param")
        dim.dim_value = int(size)


def _set_batch(g: OnnxGraph, ctx: _OpCtx, op: spec.SetBatch) -> int:
    count = 0
    inputs = set(g.input_names)
    for v in [v for v in g.graph.input if v.name in inputs] + list(g.graph.output):
        tt = v.type.tensor_type
        if not tt.HasField("shape") or len(tt.shape.dim) == 0:
            raise ctx.fail(f"graph input/output {v.name!r} has no declared shape; cannot set its batch size")
        _dim_set(tt.shape.dim[0], op.size, op.dim_param)
        count += 1
    # intermediate shapes carry the old batch: drop them (the graph check re-infers what it needs)
    _refresh_value_info(g)
    return count


def _refresh_value_info(g: OnnxGraph) -> None:
    """Re-infer the shapes of the tensors that had value_info (they may carry a stale batch size)."""
    import onnx

    had = [v.name for v in g.graph.value_info]
    del g.graph.value_info[:]
    if not had:
        return
    g.commit()
    try:
        inferred = onnx.shape_inference.infer_shapes(g.model)
    except Exception:  # noqa: BLE001 - the graph check reports the problem
        return  # the graph check reports the problem
    by_name = {v.name: v for v in inferred.graph.value_info}
    g.graph.value_info.extend(by_name[n] for n in had if n in by_name)


def _float_output(g: OnnxGraph, ctx: _OpCtx, v: Any) -> int:
    import onnx

    elem = v.type.tensor_type.elem_type
    if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                    onnx.TensorProto.BFLOAT16):
        raise ctx.fail(f"graph output {v.name!r} is not a float tensor")
    return int(elem)


def _unique(g: OnnxGraph, base: str) -> str:
    taken = g.all_names() | g.node_names()
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _l2_normalize(g: OnnxGraph, ctx: _OpCtx, op: spec.L2NormalizeOutput) -> int:
    from onnx import helper, numpy_helper

    count = 0
    for v in list(g.graph.output):
        out = v.name
        elem = _float_output(g, ctx, v)
        if out in g.input_names or g.producer(out) is None:
            raise ctx.fail(f"graph output {out!r} is not produced by a node")
        raw = _unique(g, f"{out}__unnormalized")
        g.rename_tensor(out, raw)
        for vo in g.graph.output:  # the graph output keeps its name, now on the normalised tensor
            if vo.name == raw:
                vo.name = out
        norm, clamped = _unique(g, f"{out}__l2norm"), _unique(g, f"{out}__l2norm_clamped")
        eps_name = _unique(g, f"{out}__l2norm_eps")
        np_dtype = helper.tensor_dtype_to_np_dtype(elem)
        g.graph.initializer.append(numpy_helper.from_array(np.array(op.eps, dtype=np_dtype), eps_name))
        if g.opset() >= 18:
            axes_name = _unique(g, f"{out}__l2norm_axes")
            g.graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes_name))
            reduce = helper.make_node("ReduceL2", [raw, axes_name], [norm], name=_unique(g, f"{out}__l2norm"),
                                      keepdims=1)
        else:
            reduce = helper.make_node("ReduceL2", [raw], [norm], name=_unique(g, f"{out}__l2norm"), axes=[-1],
                                      keepdims=1)
        g.nodes.append(reduce)
        g.nodes.append(helper.make_node("Max", [norm, eps_name], [clamped], name=_unique(g, f"{out}__l2norm_clamp")))
        g.nodes.append(helper.make_node("Div", [raw, clamped], [out], name=_unique(g, f"{out}__l2normalize")))
        count += 1
    return count


def _uint8_bgr_input(g: OnnxGraph, ctx: _OpCtx, op: spec.Uint8BgrInput) -> int:
    import onnx
    from onnx import helper, numpy_helper

    names = g.input_names
    if len(names) != 1:
        raise ctx.fail(f"the graph has {len(names)} inputs ({', '.join(names)}); uint8_bgr_input needs exactly one")
    x = names[0]
    v = next(v for v in g.graph.input if v.name == x)
    tt = v.type.tensor_type
    dims = list(tt.shape.dim) if tt.HasField("shape") else []
    if tt.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        raise ctx.fail(f"graph input {x!r} is not a float tensor (already uint8?)")
    if len(dims) != 4 or dims[1].dim_value != 3:
        raise ctx.fail(f"graph input {x!r} must be float [N, 3, H, W]; it is {_shape_text(tt)}")
    elem = tt.elem_type
    float_nhwc = _unique(g, f"{x}__float_nhwc")
    nchw = _unique(g, f"{x}__float_nchw_bgr" if op.model_color == "RGB" else f"{x}__float_nchw")
    final = _unique(g, f"{x}__float_nchw") if op.model_color == "RGB" else nchw
    g.replace_input(x, final)
    new_nodes = [
        helper.make_node("Cast", [x], [float_nhwc], name=_unique(g, f"{x}__cast"), to=elem),
        helper.make_node("Transpose", [float_nhwc], [nchw], name=_unique(g, f"{x}__to_nchw"), perm=[0, 3, 1, 2]),
    ]
    if op.model_color == "RGB":
        idx = _unique(g, f"{x}__bgr_to_rgb_index")
        g.graph.initializer.append(numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), idx))
        new_nodes.append(helper.make_node("Gather", [nchw, idx], [final], name=_unique(g, f"{x}__bgr_to_rgb"),
                                          axis=1))
    g.nodes[0:0] = new_nodes
    n, h, w = dims[0], dims[2], dims[3]
    new_dims = []
    for d in (n, h, w):
        c = onnx.TensorShapeProto.Dimension()
        c.CopyFrom(d)
        new_dims.append(c)
    tt.elem_type = onnx.TensorProto.UINT8
    del tt.shape.dim[:]
    for d in new_dims:
        tt.shape.dim.add().CopyFrom(d)
    tt.shape.dim.add().dim_value = 3
    return 1


def _strip_metadata(g: OnnxGraph, ctx: _OpCtx, op: spec.StripMetadata) -> int:
    count = len(g.model.metadata_props)
    del g.model.metadata_props[:]
    for holder in [g.model, g.graph] + g.nodes + list(g.graph.input) + list(g.graph.output) + list(g.graph.value_info) \
            + list(g.graph.initializer):
        if holder.doc_string:
            holder.doc_string = ""
            count += 1
    for n in g.nodes:
        for a in n.attribute:
            if a.doc_string:
                a.doc_string = ""
                count += 1
    if op.producer:
        for f in ("producer_name", "producer_version"):
            if getattr(g.model, f):
                g.model.ClearField(f)
                count += 1
    return count


_OPS: dict[str, Callable[[OnnxGraph, _OpCtx, Any], int]] = {
    "rename_tensor": _rename_tensor, "rename_node": _rename_node, "remove_node": _remove_node,
    "remove_field": _remove_field, "set_field": _set_field, "insert_after": _insert, "insert_before": _insert,
    "set_batch": _set_batch, "l2_normalize_output": _l2_normalize, "uint8_bgr_input": _uint8_bgr_input,
    "strip_metadata": _strip_metadata,
}


def apply_patch(model: Any, lp: spec.LoadedPatch, what: str) -> list[dict[str, Any]]:
    """Apply every op of ``lp`` to ``model`` (in place); returns one record per op (op, matched)."""
    g = OnnxGraph(model)
    records = []
    for i, op in enumerate(lp.model.ops):
        fn = _OPS.get(op.op)
        if fn is None:  # the loader refuses Caffe-only ops in ONNX patches; this is a safety net
            raise PatchError(f"{lp.op_label(i)}: {op.op} is not an ONNX op")
        matched = fn(g, _OpCtx(lp, i, what), op)
        rec: dict[str, Any] = {"op": op.op, "matched": matched}
        if matched == 0:
            rec["skipped"] = True
        records.append(rec)
    g.commit()
    _tidy(g)
    return records


def _tidy(g: OnnxGraph) -> None:
    """Drop value_info of tensors that no longer exist; give graph outputs without a type their inferred one."""
    import onnx

    live = {x for n in g.nodes for x in list(n.input) + list(n.output)} | set(g.input_names)
    g.drop_value_info([v.name for v in g.graph.value_info if v.name not in live])
    missing = [v.name for v in g.graph.output
               if not v.type.tensor_type.elem_type or not v.type.tensor_type.HasField("shape")]
    if not missing:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(g.model)
    except Exception:  # noqa: BLE001 - the graph check reports the problem
        return
    by_name = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for v in g.graph.output:
        src = by_name.get(v.name)
        if v.name in missing and src is not None and src.type.tensor_type.elem_type:
            v.type.CopyFrom(src.type)


# --------------------------------------------------------------------------------------------- check


def _shape_text(tt: Any) -> str:
    import onnx

    elem = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "?"
    if not tt.HasField("shape"):
        return f"{elem}[?]"
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return f"{elem}[{','.join(dims)}]"


def check_model(model: Any, input_shape: tuple[int, int, int, int], what: str,
                source: Optional[Any] = None, images: Optional[np.ndarray] = None) -> None:
    """onnx checker, strict shape inference and onnxruntime runs on real-looking images; StageFailed says
    what broke.

    ``images`` (float32 NCHW 0..255, fed by the input's declared type) are the stage's self-check images;
    without them, person-like images of ``input_shape``. With a symbolic batch the graph is run at two batch
    sizes, which catches a batch size baked into a Reshape. A non-finite output fails unless the unpatched
    ``source`` gives it on the same image as well (then it is the model's, not the patch's).
    """
    import onnx

    from .. import selfcheck

    data = model.SerializeToString()
    try:
        onnx.checker.check_model(data)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"{what}: the ONNX checker rejects the patched graph: {_first_line(exc)}") from None
    try:
        onnx.shape_inference.infer_shapes(data, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"{what}: shape inference fails on the patched graph: {_first_line(exc)}") from None
    probe = _probe(images, input_shape)
    sess = selfcheck.open_session(data, f"{what}: the patched graph")
    dim0 = sess.get_inputs()[0].shape[0] if sess.get_inputs() and sess.get_inputs()[0].shape else input_shape[0]
    sizes = [dim0] if isinstance(dim0, int) and dim0 > 0 else [input_shape[0], input_shape[0] + 1]
    unpatched: dict[str, Any] = {}  # the unpatched graph's session, opened only if an output is non-finite

    def source_session() -> Any:
        if source is not None and "s" not in unpatched:
            unpatched["s"] = selfcheck.open_session(source.SerializeToString(), what)
        return unpatched.get("s")

    for n in sizes:
        batch = selfcheck.batch_of(probe.images, n)
        outs, params = selfcheck.run_outputs(sess, batch, f"{what}: the patched graph")
        for v in model.graph.output:
            got = outs.get(v.name)
            if got is None:
                raise StageFailed(f"{what}: onnxruntime gives no output {v.name!r}")
            _check_declared_shape(v, got, params, n, what)
            if got.dtype.kind == "f":
                selfcheck.judge_finite(got, _names(probe, n), f"{what}: output {v.name!r} of the patched graph",
                                       lambda v=v, got=got, batch=batch: _source_output(source_session(), batch,
                                                                                        v.name, got),
                                       "the unpatched graph")


def _probe(images: Optional[np.ndarray], input_shape: tuple[int, int, int, int]) -> Any:
    from ..probe import Probe, probe_images

    if images is None:
        return probe_images(input_shape[2], input_shape[3])
    return Probe(np.asarray(images, dtype=np.float32), [f"self-check image #{i}" for i in range(len(images))],
                 "self-check images")


def _names(probe: Any, n: int) -> Any:
    """The probe relabelled for a batch of ``n`` (images repeat when the batch is larger)."""
    from ..probe import Probe

    return Probe(probe.images, [probe.names[i % len(probe.names)] for i in range(n)], probe.source)


def _check_declared_shape(v: Any, got: np.ndarray, params: dict[str, int], n: int, what: str) -> None:
    dims = list(v.type.tensor_type.shape.dim) if v.type.tensor_type.HasField("shape") else None
    if dims is None:
        return
    want = [d.dim_value if d.HasField("dim_value") else params.get(d.dim_param) for d in dims]
    if len(want) != got.ndim or any(w is not None and w != s for w, s in zip(want, got.shape)):
        raise StageFailed(f"{what}: output {v.name!r} is declared {_shape_text(v.type.tensor_type)} "
                          f"but has shape {list(got.shape)} at batch {n}")


def _source_output(sess: Any, batch: np.ndarray, name: str, like: np.ndarray) -> np.ndarray:
    """The unpatched graph's output ``name`` on ``batch``; finite stand-in when it has none (patch to blame)."""
    from .. import selfcheck

    if sess is None:
        return np.zeros_like(like, dtype=np.float64)
    try:
        outs, _ = selfcheck.run_outputs(sess, batch, "the unpatched graph")
    except StageFailed:
        return np.zeros_like(like, dtype=np.float64)
    ref = outs.get(name)
    if ref is None or len(ref) != len(like):
        ref = next((r for r in outs.values() if r.dtype.kind == "f" and len(r) == len(like)), None)
    return np.zeros_like(like, dtype=np.float64) if ref is None else ref


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:500]


# -------------------------------------------------------------------------------------------- listing


def _attr_text(a: Any) -> str:
    import onnx
    from onnx import helper

    A = onnx.AttributeProto
    if a.type == A.TENSOR:
        t = a.t
        dims = "x".join(str(d) for d in t.dims) or "scalar"
        arr = None
        try:
            from onnx import numpy_helper

            arr = numpy_helper.to_array(t)
        except Exception:  # noqa: BLE001 - not a constant numpy can read: shown without values
            pass
        if arr is not None and arr.size <= 8:
            return f"{a.name}=tensor({arr.tolist()})"
        return f"{a.name}=tensor({onnx.TensorProto.DataType.Name(t.data_type).lower()}[{dims}])"
    if a.type in (A.GRAPH, A.GRAPHS):
        return f"{a.name}=<graph>"
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    elif isinstance(v, list):
        v = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
    if isinstance(v, float):
        v = float(f"{v:.7g}")
    elif isinstance(v, list):
        v = [float(f"{x:.7g}") if isinstance(x, float) else x for x in v]
    return f"{a.name}={v}"


def listing(model: Any) -> str:
    """A stable, line-per-fact text of a model: metadata, inputs, initializers, nodes (with edges), outputs."""
    import onnx

    g = model.graph
    lines = [f"model ir_version={model.ir_version} producer={model.producer_name!r} {model.producer_version!r}"]
    for o in model.opset_import:
        lines.append(f"opset {o.domain or 'ai.onnx'} {o.version}")
    for p in model.metadata_props:
        lines.append(f"metadata {p.key}={p.value!r}")
    if model.doc_string:
        lines.append(f"doc_string {model.doc_string[:80]!r}")
    init = {t.name: t for t in g.initializer}
    for v in g.input:
        if v.name not in init:
            lines.append(f"input  {v.name}: {_shape_text(v.type.tensor_type)}")
    for name in sorted(init):
        t = init[name]
        dims = ",".join(str(d) for d in t.dims)
        lines.append(f"init   {name}: {onnx.TensorProto.DataType.Name(t.data_type).lower()}[{dims}]")
    for n in g.node:
        attrs = ", ".join(_attr_text(a) for a in sorted(n.attribute, key=lambda a: a.name))
        dom = f"{n.domain}::" if n.domain else ""
        lines.append(f"node   {n.name or '(unnamed)'}: {dom}{n.op_type}({', '.join(n.input)}) -> "
                     f"({', '.join(n.output)})" + (f" {{{attrs}}}" if attrs else ""))
    for v in g.output:
        lines.append(f"output {v.name}: {_shape_text(v.type.tensor_type)}")
    return "\n".join(lines) + "\n"
