"""Graph patch ops on Caffe nets (prototxt + caffemodel), the check run after every patch, and shapes.

Caffe names blobs, and in-place layers (ReLU with ``bottom: x  top: x``) reuse a name for a new value. To
edit without getting that wrong, a net is held in SSA form while a patch runs: every top creates a
:class:`Blob` value, every bottom points at the value it reads. Ops rewire values, then names are written
back and re-read: if the names no longer lead every layer to the value it should read (an edit made one
blob shadow another), the op is refused instead of silently changing the numbers.

Weights travel with their layer: the caffemodel is rewritten from the patched layer list, each layer
taking the blobs of the layer it was before any rename (:attr:`CLayer.origin`).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

from ..caffe.convert import caffe_pool_size
from ..errors import NotExpressible, PatchError, StageFailed
from . import spec
from .opctx import OpContext

# layer types that need learned blobs: a patch cannot insert them (it has no weights to give)
WEIGHTED_TYPES = ("Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "Scale", "Bias", "PReLU", "Embed")
# fields a patch must change through graph ops, not set_field/remove_field
GRAPH_FIELDS = ("name", "bottom", "top", "blobs")


def schema() -> Any:
    """reidbuild's own Caffe schema module (imported lazily: ONNX-only builds never need it)."""
    from ..caffe import schema as s

    return s


# ----------------------------------------------------------------------------------------------- SSA


class Blob:
    """One value of a blob: written by one top (or a net input), read by any number of bottoms."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Blob({self.name!r}@{id(self):x})"


class CLayer:
    __slots__ = ("msg", "origin", "bottoms", "tops")

    def __init__(self, msg: Any, origin: Optional[str], bottoms: list[Blob], tops: list[Blob]) -> None:
        self.msg = msg
        self.origin = origin  # the layer's name in the source net (its weights' key), None if inserted
        self.bottoms = bottoms
        self.tops = tops

    @property
    def name(self) -> str:
        return self.msg.name

    @property
    def type(self) -> str:
        return self.msg.type

    def label(self) -> str:
        return f"{self.msg.name or '(unnamed)'} [{self.msg.type}]"


class CaffeNet:
    """A net under edit: header (name, inputs), layers in order, and the value each bottom reads."""

    def __init__(self, net: Any) -> None:
        if "layers" in net.DESCRIPTOR.fields_by_name and len(net.layers):
            raise NotExpressible("the net uses deprecated V1 'layers' entries; only 'layer' is supported")
        self.dialect = schema().dialect_of(net)
        self.header = type(net)()
        self.header.CopyFrom(net)
        self.header.ClearField("layer")
        self.inputs = [Blob(n) for n in net.input]
        cur: dict[str, Blob] = {b.name: b for b in self.inputs}
        self.dangling: list[tuple[str, str]] = []  # (layer, blob) read before anything wrote it
        self.layers: list[CLayer] = []
        self.removed: set[str] = set()  # origins of layers removed on purpose (their weights go too)
        for lm in net.layer:
            msg = type(lm)()
            msg.CopyFrom(lm)
            bottoms = []
            for b in msg.bottom:
                if b not in cur:
                    self.dangling.append((msg.name, b))
                    cur[b] = Blob(b)
                bottoms.append(cur[b])
            tops = []
            for t in msg.top:
                blob = Blob(t)
                cur[t] = blob
                tops.append(blob)
            self.layers.append(CLayer(msg, msg.name, bottoms, tops))

    @property
    def layer_class(self) -> Any:
        return schema().message_class("LayerParameter", self.dialect)

    def readers(self, blob: Blob) -> list[CLayer]:
        return [la for la in self.layers if any(b is blob for b in la.bottoms)]

    def writer(self, blob: Blob) -> Optional[CLayer]:
        for la in self.layers:
            if any(t is blob for t in la.tops):
                return la
        return None

    def outputs(self) -> list[Blob]:
        """Values nobody reads: the net's outputs."""
        read = {id(b) for la in self.layers for b in la.bottoms}
        return [t for la in self.layers for t in la.tops if id(t) not in read]

    def blob_names(self) -> set[str]:
        names = {b.name for b in self.inputs}
        for la in self.layers:
            names.update(b.name for b in la.bottoms)
            names.update(t.name for t in la.tops)
        return names

    def layer_names(self) -> set[str]:
        return {la.name for la in self.layers}

    def index(self, layer: CLayer) -> int:
        for i, la in enumerate(self.layers):
            if la is layer:
                return i
        raise ValueError("layer is not in the net")

    def replace_reads(self, old: Blob, new: Blob, skip: Optional[CLayer] = None) -> None:
        for la in self.layers:
            if la is skip:
                continue
            la.bottoms = [new if b is old else b for b in la.bottoms]

    def inplace_chain(self, blob: Blob) -> list[Blob]:
        """``blob`` and the values in-place layers derive from it under the same name (x -> ReLU -> x ...)."""
        chain = [blob]
        ids = {id(blob)}
        for la in self.layers:
            for b in la.bottoms:
                if id(b) in ids:
                    for t in la.tops:
                        if t.name == b.name and id(t) not in ids:
                            chain.append(t)
                            ids.add(id(t))
        return chain

    def materialize(self) -> Any:
        """Write names back into messages; refuse if the names would not lead each bottom to its value."""
        net = type(self.header)()
        net.CopyFrom(self.header)
        del net.input[:]
        net.input.extend(b.name for b in self.inputs)
        cur: dict[str, Blob] = {}
        for b in self.inputs:
            if b.name in cur:
                raise _Alias(f"two net inputs are named {b.name!r}")
            cur[b.name] = b
        for la in self.layers:
            del la.msg.bottom[:]
            la.msg.bottom.extend(b.name for b in la.bottoms)
            del la.msg.top[:]
            la.msg.top.extend(t.name for t in la.tops)
            for b in la.bottoms:
                got = cur.get(b.name)
                if got is not None and got is not b:
                    w = self.writer(got)
                    raise _Alias(f"layer {la.label()} would read blob {b.name!r} as written by "
                                 f"{w.label() if w else 'the net input'} instead of the value it reads now")
                if got is None and not any(b is d for d in self._dangling_blobs()):
                    raise _Alias(f"layer {la.label()} would read blob {b.name!r} before anything writes it")
            for t in la.tops:
                cur[t.name] = t
            net.layer.add().CopyFrom(la.msg)
        return net

    def _dangling_blobs(self) -> list[Blob]:
        produced = {id(b) for b in self.inputs} | {id(t) for la in self.layers for t in la.tops}
        return [b for la in self.layers for b in la.bottoms if id(b) not in produced]


class _Alias(Exception):
    """An edit that blob names cannot express (one value would shadow another)."""


# ----------------------------------------------------------------------------------------- selection


def select(cn: CaffeNet, sel: spec.Selector) -> list[CLayer]:
    rx = re.compile(sel.regex) if sel.regex is not None else None
    outs = {id(b) for b in cn.outputs()}
    found = []
    for la in cn.layers:
        if sel.name is not None and la.name != sel.name:
            continue
        if sel.type is not None and la.type != sel.type:
            continue
        if rx is not None and not rx.fullmatch(la.name):
            continue
        if sel.producer_of is not None and sel.producer_of not in (t.name for t in la.tops):
            continue
        if sel.consumer_of is not None and sel.consumer_of not in (b.name for b in la.bottoms):
            continue
        if sel.last and not any(id(t) in outs for t in la.tops):
            continue
        found.append(la)
    return found


class _OpCtx(OpContext):
    noun = "layer"


def _select_one(cn: CaffeNet, ctx: _OpCtx, sel: spec.Selector) -> Optional[CLayer]:
    return ctx.one(select(cn, sel), sel, lambda la: la.label())


def _select_some(cn: CaffeNet, ctx: _OpCtx, sel: spec.Selector) -> list[CLayer]:
    return ctx.some(select(cn, sel), sel)


def _fresh_blob(cn: CaffeNet, ctx: _OpCtx, name: str) -> None:
    if name in cn.blob_names():
        raise ctx.fail(f"blob name {name!r} is already used in {ctx.what}")


def _fresh_layer(cn: CaffeNet, ctx: _OpCtx, name: str) -> None:
    if name in cn.layer_names():
        raise ctx.fail(f"layer name {name!r} is already used in {ctx.what}")


def _unique(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _commit(cn: CaffeNet, ctx: _OpCtx, undo: Callable[[], None]) -> None:
    """Check the edit is expressible with blob names; otherwise undo it and refuse."""
    try:
        cn.materialize()
    except _Alias as exc:
        undo()
        raise ctx.fail(f"cannot be applied to {ctx.what}: {exc}") from None


def _snapshot(cn: CaffeNet) -> Callable[[], None]:
    layers = list(cn.layers)
    wiring = [(la, list(la.bottoms), list(la.tops)) for la in layers]
    names = {id(b): (b, b.name) for la in layers for b in la.bottoms + la.tops}
    names.update({id(b): (b, b.name) for b in cn.inputs})
    inputs = list(cn.inputs)

    def undo() -> None:
        cn.layers = layers
        cn.inputs = inputs
        for la, bs, ts in wiring:
            la.bottoms, la.tops = bs, ts
        for b, n in names.values():
            b.name = n
    return undo


# --------------------------------------------------------------------------------------------- ops


def _rename_tensor(cn: CaffeNet, ctx: _OpCtx, op: spec.RenameTensor) -> int:
    undo = _snapshot(cn)
    if op.tensor is not None:
        if op.tensor not in cn.blob_names():
            if op.optional:
                return 0
            raise ctx.fail(f"blob {op.tensor!r} does not exist in {ctx.what}; add 'optional: true' to the op if "
                           "that is expected")
        if op.tensor == op.to:
            return 1
        _fresh_blob(cn, ctx, op.to)
        for b in cn.inputs + [x for la in cn.layers for x in la.bottoms + la.tops]:
            if b.name == op.tensor:
                b.name = op.to
    else:
        assert op.select is not None
        la = _select_one(cn, ctx, op.select)
        if la is None:
            return 0
        if op.output >= len(la.tops):
            raise ctx.fail(f"layer {la.label()} has no top {op.output}")
        blob = la.tops[op.output]
        if blob.name == op.to:
            return 1
        _fresh_blob(cn, ctx, op.to)
        for b in cn.inplace_chain(blob):
            b.name = op.to
    _commit(cn, ctx, undo)
    return 1


def _rename_node(cn: CaffeNet, ctx: _OpCtx, op: spec.RenameNode) -> int:
    la = _select_one(cn, ctx, op.select)
    if la is None:
        return 0
    if la.name != op.to:
        _fresh_layer(cn, ctx, op.to)
        la.msg.name = op.to
    return 1


def _remove_node(cn: CaffeNet, ctx: _OpCtx, op: spec.RemoveNode) -> int:
    targets = _select_some(cn, ctx, op.select)
    for la in targets:
        undo = _snapshot(cn)
        if len(la.bottoms) != 1 or len(la.tops) > 1:
            raise ctx.fail(f"layer {la.label()} has {len(la.bottoms)} bottom(s) and {len(la.tops)} top(s); "
                           "remove_node needs one bottom to re-wire its readers to (and at most one top)")
        u = la.bottoms[0]
        outputs = {id(b) for b in cn.outputs()}
        del cn.layers[cn.index(la)]
        cn.removed.add(la.origin or la.name)
        if la.tops:
            v = la.tops[0]
            cn.replace_reads(v, u)
            if id(v) in outputs and u.name != v.name:
                # the net's output keeps its name: the value that now ends the net takes it over
                if any(u is b for b in cn.inputs):
                    undo()
                    raise ctx.fail(f"layer {la.label()} connects net input {u.name!r} to net output {v.name!r}; "
                                   "removing it would leave nothing between them")
                u.name = v.name
        _commit(cn, ctx, undo)
    return len(targets)


def _field_path(ctx: _OpCtx, layer_cls: Any, path: str) -> list[str]:
    parts = path.split(".")
    if not all(parts):
        raise ctx.fail(f"field {path!r} is not a dotted field path like pooling_param.ceil_mode")
    if parts[0] in GRAPH_FIELDS or (parts[0] == "type" and len(parts) == 1 and ctx.op.op == "remove_field"):
        raise ctx.fail(f"field {parts[0]!r} is part of the graph: use rename_node / rename_tensor / insert / "
                       "remove_node instead")
    return parts


def _walk(msg: Any, parts: list[str], create: bool) -> tuple[Optional[Any], Optional[str]]:
    """(message holding the last field, why not) following ``parts[:-1]`` from ``msg``."""
    for p in parts[:-1]:
        fd = msg.DESCRIPTOR.fields_by_name.get(p)
        if fd is None:
            return None, f"{msg.DESCRIPTOR.name} has no field {p!r}"
        if fd.message_type is None or _is_repeated(fd):
            return None, f"{msg.DESCRIPTOR.name}.{p} is not a nested message"
        if not create and not msg.HasField(p):
            return None, None
        msg = getattr(msg, p)
    last = parts[-1]
    if last not in msg.DESCRIPTOR.fields_by_name:
        return None, f"{msg.DESCRIPTOR.name} has no field {last!r}"
    return msg, None


def _is_repeated(fd: Any) -> bool:
    rep = getattr(fd, "is_repeated", None)
    if rep is not None:
        return bool(rep)
    return fd.label == fd.LABEL_REPEATED


def _has(msg: Any, name: str) -> bool:
    fd = msg.DESCRIPTOR.fields_by_name[name]
    return len(getattr(msg, name)) > 0 if _is_repeated(fd) else msg.HasField(name)


def _remove_field(cn: CaffeNet, ctx: _OpCtx, op: spec.RemoveField) -> int:
    parts = _field_path(ctx, cn.layer_class, op.field)
    found = select(cn, op.select)
    having = []
    unknown = None
    for la in found:
        holder, why = _walk(la.msg, parts, create=False)
        if why:
            unknown = why
        if holder is not None and _has(holder, parts[-1]):
            having.append((la, holder))
    if unknown and not any(_walk(schema().message_class("LayerParameter", d)(), parts, create=True)[1] is None
                           for d in schema().DIALECTS):
        # a typo, not a field of the other dialect: even an optional op must not silently skip it
        raise ctx.fail(f"field {op.field} does not exist in any Caffe dialect ({unknown})")
    if not having and not op.optional:
        if not found:
            raise ctx.no_match(op.select)
        extra = f" ({unknown} in the {cn.dialect} dialect)" if unknown else ""
        raise ctx.fail(f"select {op.select.describe()} matched {len(found)} layer(s) but none sets "
                       f"{op.field}{extra}; add 'optional: true' to the op if that is expected")
    for _la, holder in having:
        holder.ClearField(parts[-1])
    return len(having)


def _set_scalar(holder: Any, fd: Any, value: Any) -> Any:
    """Coerce ``value`` to the field's type (enum names accepted)."""
    if fd.enum_type is not None:
        if isinstance(value, str):
            ev = fd.enum_type.values_by_name.get(value)
            if ev is None:
                raise ValueError(f"{value!r} is not one of {', '.join(fd.enum_type.values_by_name)}")
            return ev.number
        if isinstance(value, bool) or not isinstance(value, int) or value not in fd.enum_type.values_by_number:
            raise ValueError(f"{value!r} is not one of {', '.join(fd.enum_type.values_by_name)}")
        return value
    T = fd.type
    if T == fd.TYPE_BOOL:
        if not isinstance(value, bool):
            raise ValueError(f"expected true/false, got {value!r}")
        return value
    if T in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if T in (fd.TYPE_INT32, fd.TYPE_INT64, fd.TYPE_UINT32, fd.TYPE_UINT64, fd.TYPE_SINT32, fd.TYPE_SINT64):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                            and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        if T in (fd.TYPE_UINT32, fd.TYPE_UINT64) and value < 0:
            raise ValueError(f"expected a non-negative integer, got {value!r}")
        return int(value)
    if T == fd.TYPE_STRING:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    raise ValueError("fields of this type cannot be set from a patch")


def _assign(holder: Any, name: str, value: Any) -> None:
    from google.protobuf import json_format

    fd = holder.DESCRIPTOR.fields_by_name[name]
    if fd.message_type is not None:
        items = value if _is_repeated(fd) and isinstance(value, list) else [value]
        if not all(isinstance(v, dict) for v in items):
            raise ValueError(f"{name} is a message: give a mapping of its fields")
        holder.ClearField(name)
        for v in items:
            sub = getattr(holder, name).add() if _is_repeated(fd) else getattr(holder, name)
            try:
                json_format.ParseDict(v, sub)
            except json_format.ParseError as exc:
                raise ValueError(str(exc).splitlines()[0]) from None
        if not _is_repeated(fd) and not items[0]:
            getattr(holder, name).SetInParent()
        return
    if _is_repeated(fd):
        vals = value if isinstance(value, list) else [value]
        coerced = [_set_scalar(holder, fd, v) for v in vals]
        holder.ClearField(name)
        getattr(holder, name).extend(coerced)
    else:
        if isinstance(value, list):
            raise ValueError(f"{name} takes one value, not a list")
        setattr(holder, name, _set_scalar(holder, fd, value))


def _set_field(cn: CaffeNet, ctx: _OpCtx, op: spec.SetField) -> int:
    parts = _field_path(ctx, cn.layer_class, op.field)
    found = _select_some(cn, ctx, op.select)
    for la in found:
        holder, why = _walk(la.msg, parts, create=True)
        if holder is None:
            raise ctx.fail(f"field {op.field}: {why} in the {cn.dialect} dialect")
        try:
            _assign(holder, parts[-1], op.value)
        except ValueError as exc:
            raise ctx.fail(f"field {op.field}: {exc}") from None
    return len(found)


def _new_layer(cn: CaffeNet, ctx: _OpCtx, node: spec.NewNode) -> tuple[Any, str]:
    from google.protobuf import json_format

    if node.type in WEIGHTED_TYPES:
        raise ctx.fail(f"a {node.type} layer needs learned weights, which a patch cannot provide")
    bad = [k for k in node.params if k in GRAPH_FIELDS + ("type",)]
    if bad:
        raise ctx.fail(f"node.params: {bad[0]!r} is set by the op itself (node.type / node.name / node.output)")
    _fresh_layer(cn, ctx, node.name)
    out = node.output or node.name
    _fresh_blob(cn, ctx, out)
    msg = cn.layer_class()
    try:
        json_format.ParseDict(node.params, msg)
    except json_format.ParseError as exc:
        raise ctx.fail(f"node.params: {str(exc).splitlines()[0]} (the {cn.dialect} dialect's schema)") from None
    msg.name = node.name
    msg.type = node.type
    return msg, out


def _insert(cn: CaffeNet, ctx: _OpCtx, op: spec.InsertNode) -> int:
    la = _select_one(cn, ctx, op.select)
    if la is None:
        return 0
    undo = _snapshot(cn)
    msg, out = _new_layer(cn, ctx, op.node)
    new_top = Blob(out)
    if op.op == "insert_after":
        if op.output >= len(la.tops):
            raise ctx.fail(f"layer {la.label()} has no top {op.output}")
        src = la.tops[op.output]
        new = CLayer(msg, None, [src], [new_top])
        cn.replace_reads(src, new_top)
        cn.layers.insert(cn.index(la) + 1, new)
    else:
        if op.input >= len(la.bottoms):
            raise ctx.fail(f"layer {la.label()} has no bottom {op.input}")
        src = la.bottoms[op.input]
        new = CLayer(msg, None, [src], [new_top])
        la.bottoms = [new_top if i == op.input else b for i, b in enumerate(la.bottoms)]
        cn.layers.insert(cn.index(la), new)
    _commit(cn, ctx, undo)
    return 1


# ------------------------------------------------------------------------------- pooling and shapes


def _pool_geometry(p: Any) -> tuple[int, int, int, int, int, int]:
    """(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w) as Caffe's PoolingLayer reads them."""
    kh = p.kernel_h if p.HasField("kernel_h") else p.kernel_size
    kw = p.kernel_w if p.HasField("kernel_w") else p.kernel_size
    sh = p.stride_h if p.HasField("stride_h") else p.stride
    sw = p.stride_w if p.HasField("stride_w") else p.stride
    ph = p.pad_h if p.HasField("pad_h") else p.pad
    pw = p.pad_w if p.HasField("pad_w") else p.pad
    return kh, kw, sh, sw, ph, pw


def _rounds_up(p: Any) -> bool:
    """True when this pooling layer rounds up (BVLC always; the fork unless ceil_mode: false)."""
    return not ("ceil_mode" in p.DESCRIPTOR.fields_by_name and p.HasField("ceil_mode") and not p.ceil_mode)


_SAME_SHAPE = ("ReLU", "ReLU6", "PReLU", "Sigmoid", "TanH", "ELU", "Dropout", "BatchNorm", "Scale", "Bias", "Power",
               "AbsVal", "BNLL", "Exp", "Log", "Softmax", "LRN", "MVN", "Normalize", "Clip", "Swish", "Threshold",
               "HardSigmoid", "Mish", "GELU", "Split")


def _conv_geometry(c: Any) -> tuple[int, int, int, int, int, int, int, int]:
    def pick(single_h: str, single_w: str, rep: str, default: int) -> tuple[int, int]:
        vals = list(getattr(c, rep))
        h = getattr(c, single_h) if c.HasField(single_h) else (vals[0] if vals else default)
        w = getattr(c, single_w) if c.HasField(single_w) else (vals[-1] if vals else default)
        return h, w
    kh, kw = pick("kernel_h", "kernel_w", "kernel_size", 1)
    sh, sw = pick("stride_h", "stride_w", "stride", 1)
    ph, pw = pick("pad_h", "pad_w", "pad", 0)
    dil = list(c.dilation)
    dh, dw = (dil[0], dil[-1]) if dil else (1, 1)
    return kh, kw, sh, sw, ph, pw, dh, dw


def layer_shapes(la: CLayer, ins: list[Optional[tuple[int, ...]]]) -> list[Optional[tuple[int, ...]]]:
    """Top shapes of one layer from its bottom shapes (None where unknown); ValueError if inconsistent."""
    t, m = la.type, la.msg
    n_tops = len(la.tops)
    if t == "Input":
        shapes = [tuple(s.dim) for s in m.input_param.shape]
        if len(shapes) == 1:
            shapes = shapes * n_tops
        return [shapes[i] if i < len(shapes) else None for i in range(n_tops)]
    if any(s is None for s in ins) or not ins:
        return [None] * n_tops
    b0 = ins[0]
    assert b0 is not None
    if t in _SAME_SHAPE:
        return [b0] * n_tops
    if t in ("Convolution", "Deconvolution", "Pooling") and len(b0) != 4:
        raise ValueError(f"{t} needs a 4-D input, got shape {list(b0)}")
    if t in ("Convolution", "Deconvolution") and len(b0) == 4:
        c = m.convolution_param
        kh, kw, sh, sw, ph, pw, dh, dw = _conv_geometry(c)
        if t == "Convolution":
            h = (b0[2] + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
            w = (b0[3] + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        else:
            h = (b0[2] - 1) * sh - 2 * ph + dh * (kh - 1) + 1
            w = (b0[3] - 1) * sw - 2 * pw + dw * (kw - 1) + 1
        if h < 1 or w < 1:
            raise ValueError(f"output would be {h}x{w}")
        return [(b0[0], c.num_output, h, w)]
    if t == "Pooling" and len(b0) == 4:
        p = m.pooling_param
        if p.global_pooling:
            return [(b0[0], b0[1], 1, 1)] * n_tops
        kh, kw, sh, sw, ph, pw = _pool_geometry(p)
        ceil = _rounds_up(p)
        h = caffe_pool_size(b0[2], kh, sh, ph, ceil, bool(ph or pw))
        w = caffe_pool_size(b0[3], kw, sw, pw, ceil, bool(ph or pw))
        if h < 1 or w < 1:
            raise ValueError(f"output would be {h}x{w}")
        return [(b0[0], b0[1], h, w)] * n_tops
    if t == "InnerProduct":
        axis = m.inner_product_param.axis % len(b0)
        return [tuple(b0[:axis]) + (m.inner_product_param.num_output,)]
    if t == "Eltwise":
        if any(s != b0 for s in ins):
            raise ValueError(f"bottom shapes differ: {', '.join(str(list(s)) for s in ins if s)}")
        return [b0]
    if t == "Concat":
        axis = m.concat_param.axis % len(b0)
        if any(len(s) != len(b0) or s[:axis] + s[axis + 1:] != b0[:axis] + b0[axis + 1:] for s in ins if s):
            raise ValueError("bottom shapes differ outside the concat axis")
        return [b0[:axis] + (sum(s[axis] for s in ins if s),) + b0[axis + 1:]]
    if t == "Flatten":
        a = m.flatten_param.axis % len(b0)
        e = m.flatten_param.end_axis % len(b0)
        return [b0[:a] + (math.prod(b0[a:e + 1]),) + b0[e + 1:]]
    if t == "Reshape":
        rp = m.reshape_param
        if rp.axis != 0 or rp.num_axes != -1:
            return [None]
        dims = list(rp.shape.dim)
        out = [b0[i] if d == 0 else d for i, d in enumerate(dims)]
        if out.count(-1) == 1:
            known = math.prod(d for d in out if d != -1)
            out[out.index(-1)] = math.prod(b0) // known if known else 0
        if math.prod(out) != math.prod(b0):
            raise ValueError(f"cannot reshape {list(b0)} to {dims}")
        return [tuple(out)]
    if t == "Slice":
        sp = m.slice_param
        axis = sp.axis % len(b0)
        points = list(sp.slice_point)
        if points:
            if len(points) != n_tops - 1 or points != sorted(points) or points[-1] >= b0[axis] or points[0] <= 0:
                raise ValueError(f"slice points {points} do not split axis {axis} of size {b0[axis]} into {n_tops}")
            edges = [0] + points + [b0[axis]]
        else:
            if b0[axis] % n_tops:
                raise ValueError(f"axis {axis} of size {b0[axis]} does not split evenly into {n_tops}")
            step = b0[axis] // n_tops
            edges = [i * step for i in range(n_tops + 1)]
        return [b0[:axis] + (edges[i + 1] - edges[i],) + b0[axis + 1:] for i in range(n_tops)]
    if t == "Silence":
        return []
    return [None] * n_tops


def _net_input_shapes(cn: CaffeNet, fallback: Optional[tuple[int, ...]]) -> dict[int, Optional[tuple[int, ...]]]:
    h = cn.header
    shapes: dict[int, Optional[tuple[int, ...]]] = {}
    for i, b in enumerate(cn.inputs):
        s: Optional[tuple[int, ...]] = None
        if i < len(h.input_shape):
            s = tuple(h.input_shape[i].dim)
        elif len(h.input_dim) >= 4 * (i + 1):
            s = tuple(h.input_dim[4 * i: 4 * i + 4])
        elif i == 0 and fallback is not None:
            s = tuple(fallback)
        shapes[id(b)] = s
    return shapes


def infer_shapes(cn: CaffeNet, fallback: Optional[tuple[int, ...]] = None,
                 upto: Optional[CLayer] = None) -> dict[int, Optional[tuple[int, ...]]]:
    """Shape of every value (keyed by id), walking layers in order; stops before ``upto``.

    Raises ValueError naming the layer whose shapes are inconsistent.
    """
    shapes = _net_input_shapes(cn, fallback)
    for la in cn.layers:
        if la is upto:
            break
        try:
            outs = layer_shapes(la, [shapes.get(id(b)) for b in la.bottoms])
        except ValueError as exc:
            raise ValueError(f"layer {la.label()}: {exc}") from None
        for t, s in zip(la.tops, outs):
            shapes[id(t)] = s
    return shapes


def _convert_pooling(cn: CaffeNet, ctx: _OpCtx, op: spec.ConvertPoolingRounding) -> int:
    sel = op.select or spec.Selector(type="Pooling")
    found = select(cn, sel)
    pools = [la for la in found if la.type == "Pooling"]
    if len(pools) != len(found):
        other = next(la for la in found if la.type != "Pooling")
        raise ctx.fail(f"select {sel.describe()} matches layer {other.label()}, which is not a Pooling layer")
    has_field = "ceil_mode" in cn.layer_class().pooling_param.DESCRIPTOR.fields_by_name
    if op.to == "ceil_mode":
        if not has_field:
            raise NotExpressible(f"{ctx.label}: the {cn.dialect} dialect has no ceil_mode field; converting to "
                                 "the ceil_mode dialect needs a Caffe target with dialect: ceil_mode")
        todo = [la for la in pools if not la.msg.pooling_param.HasField("ceil_mode")]
        if not todo and not op.optional:
            raise ctx.fail(f"every selected Pooling layer already states ceil_mode in {ctx.what}; add "
                           "'optional: true' to the op if that is expected")
        for la in todo:  # BVLC pooling rounds up: say so explicitly
            la.msg.pooling_param.ceil_mode = True
        return len(todo)
    # to bvlc: drop the field; floor pooling only when ceil gives the same shape (or the extra row is sliced off)
    todo = [la for la in pools if has_field and la.msg.pooling_param.HasField("ceil_mode")]
    if not todo:
        if op.optional:
            return 0
        if not pools:
            raise ctx.no_match(sel)
        raise ctx.fail(f"no selected Pooling layer sets ceil_mode in {ctx.what} (the {cn.dialect} dialect); it "
                       "already rounds like BVLC Caffe. Add 'optional: true' to the op if that is expected")
    for la in todo:
        p = la.msg.pooling_param
        if p.ceil_mode or p.global_pooling:
            p.ClearField("ceil_mode")
            continue
        try:
            shapes = infer_shapes(cn, ctx.input_shape, upto=la)
        except ValueError as exc:
            raise StageFailed(f"{ctx.label}: cannot compute the shapes before {la.label()}: {exc}") from None
        b0 = shapes.get(id(la.bottoms[0])) if la.bottoms else None
        if b0 is None or len(b0) != 4:
            unknown = _first_unknown(cn, shapes, la)
            raise NotExpressible(f"{ctx.label}: cannot tell whether {la.label()} changes shape when rounding up: "
                                 f"the input shape is unknown{unknown}")
        kh, kw, sh, sw, ph, pw = _pool_geometry(p)
        anyp = bool(ph or pw)
        fh, fw = caffe_pool_size(b0[2], kh, sh, ph, False, anyp), caffe_pool_size(b0[3], kw, sw, pw, False, anyp)
        ch, cw = caffe_pool_size(b0[2], kh, sh, ph, True, anyp), caffe_pool_size(b0[3], kw, sw, pw, True, anyp)
        p.ClearField("ceil_mode")
        if (fh, fw) == (ch, cw):
            continue
        if op.on_shape_change == "refuse":
            raise NotExpressible(
                f"{ctx.label}: {la.label()} rounds down (ceil_mode: false): on its {b0[2]}x{b0[3]} input it gives "
                f"{fh}x{fw}, BVLC rounding would give {ch}x{cw}. Removing ceil_mode would change the network; "
                "set on_shape_change: slice to cut the extra row/column off exactly")
        _slice_off(cn, ctx, la, (fh, fw), (ch, cw))
    return len(todo)


def _first_unknown(cn: CaffeNet, shapes: dict[int, Any], upto: CLayer) -> str:
    for la in cn.layers:
        if la is upto:
            break
        if la.tops and any(shapes.get(id(t)) is None for t in la.tops):
            return f" (reidbuild cannot infer the shape through layer {la.label()})"
    return ""


def _slice_off(cn: CaffeNet, ctx: _OpCtx, la: CLayer, floor: tuple[int, int], ceil: tuple[int, int]) -> None:
    """After a pooling layer that now rounds up, keep the first floor rows/columns (the same windows)."""
    undo = _snapshot(cn)
    v = la.tops[0]
    blobs, layers = cn.blob_names(), cn.layer_names()
    visible = v.name
    v.name = _unique(blobs, f"{visible}__ceil")
    blobs.add(v.name)
    cur = v
    dropped = []
    new_layers = []
    for axis, (f, c) in ((2, (floor[0], ceil[0])), (3, (floor[1], ceil[1]))):
        if f == c:
            continue
        hw = "h" if axis == 2 else "w"
        lname = _unique(layers, f"{la.name}__crop_{hw}")
        layers.add(lname)
        keep = Blob(_unique(blobs, f"{visible}__kept_{hw}"))
        blobs.add(keep.name)
        drop = Blob(_unique(blobs, f"{visible}__dropped_{hw}"))
        blobs.add(drop.name)
        msg = cn.layer_class()
        msg.name, msg.type = lname, "Slice"
        msg.slice_param.axis = axis
        msg.slice_param.slice_point.append(f)
        new_layers.append(CLayer(msg, None, [cur], [keep, drop]))
        dropped.append(drop)
        cur = keep
    cur.name = visible
    silence = cn.layer_class()
    silence.name, silence.type = _unique(layers, f"{la.name}__crop_silence"), "Silence"
    new_layers.append(CLayer(silence, None, dropped, []))
    for layer in cn.layers:
        if layer is not la:
            layer.bottoms = [cur if b is v else b for b in layer.bottoms]
    new_layers[0].bottoms = [v]
    at = cn.index(la) + 1
    cn.layers[at:at] = new_layers
    _commit(cn, ctx, undo)


_OPS: dict[str, Callable[[CaffeNet, _OpCtx, Any], int]] = {
    "rename_tensor": _rename_tensor, "rename_node": _rename_node, "remove_node": _remove_node,
    "remove_field": _remove_field, "set_field": _set_field, "insert_after": _insert, "insert_before": _insert,
    "convert_pooling_rounding": _convert_pooling,
}


def apply_patch(cn: CaffeNet, lp: spec.LoadedPatch, what: str,
                input_shape: Optional[tuple[int, ...]]) -> list[dict[str, Any]]:
    """Apply every op of ``lp`` to ``cn`` (in place); returns one record per op (op, matched)."""
    records = []
    for i, op in enumerate(lp.model.ops):
        fn = _OPS.get(op.op)
        if fn is None:
            raise PatchError(f"{lp.op_label(i)}: {op.op} is not a Caffe op")
        matched = fn(cn, _OpCtx(lp, i, what, input_shape), op)
        rec: dict[str, Any] = {"op": op.op, "matched": matched}
        if matched == 0:
            rec["skipped"] = True
        records.append(rec)
    return records


# ------------------------------------------------------------------------------------------- check


def expected_blob_shapes(la: CLayer, b0: Optional[tuple[int, ...]]) -> Optional[list[tuple[int, ...]]]:
    """The learned blobs' shapes a layer needs on input ``b0`` (None where reidbuild does not know)."""
    if b0 is None:
        return None
    m = la.msg
    if la.type == "Convolution" and len(b0) == 4:
        c = m.convolution_param
        kh, kw = _conv_geometry(c)[:2]
        shapes = [(c.num_output, b0[1] // max(c.group, 1), kh, kw)]
        return shapes + [(c.num_output,)] if c.bias_term else shapes
    if la.type == "InnerProduct":
        ip = m.inner_product_param
        k = math.prod(b0[ip.axis % len(b0):])
        shapes = [(k, ip.num_output) if ip.transpose else (ip.num_output, k)]
        return shapes + [(ip.num_output,)] if ip.bias_term else shapes
    if la.type == "BatchNorm" and len(b0) >= 2:
        return [(b0[1],), (b0[1],), (1,)]
    if la.type == "Scale" and len(la.bottoms) == 1 and len(b0) >= 2 and m.scale_param.axis == 1 \
            and m.scale_param.num_axes == 1:
        return [(b0[1],), (b0[1],)] if m.scale_param.bias_term else [(b0[1],)]
    return None


def _blob_shape(blob: Any) -> tuple[int, ...]:
    if blob.HasField("shape"):
        return tuple(blob.shape.dim)
    return tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))


def _same_shape(want: tuple[int, ...], have: tuple[int, ...], has_shape: bool) -> bool:
    """Caffe's own rule (Blob::ShapeEquals): exact for shaped blobs; legacy 4-D blobs compare padded to 4-D.

    Only the element count matching is not enough: Caffe aborts the whole process on a shape mismatch.
    """
    if has_shape:
        return tuple(want) == tuple(have)
    pad = lambda t: (1,) * (4 - len(t)) + tuple(t) if len(t) <= 4 else tuple(t)
    return pad(want) == pad(have)


def check_net(cn: CaffeNet, what: str, input_shape: Optional[tuple[int, ...]],
              weighted: set[str], extra_dialects: tuple[str, ...] = (),
              weights: Optional[dict[str, Any]] = None) -> tuple[Any, str]:
    """Re-read the patched net with the dialect's schema and walk it; returns (NetParameter, prototxt text).

    Checks: the text parses again (also with ``extra_dialects``); layer names are unique; every bottom is
    produced before use; every layer that had weights still finds them; shapes stay consistent where
    reidbuild can compute them, weight shapes included (``weights``: caffemodel layers by name).
    """
    s = schema()
    try:
        net = cn.materialize()
    except _Alias as exc:  # ops check this already; kept as a safety net
        raise StageFailed(f"{what}: {exc}") from None
    text = s.net_to_text(net)
    for d in (cn.dialect,) + tuple(extra_dialects):
        try:
            s.parse_prototxt(text, d)
        except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
            raise StageFailed(f"{what}: the patched prototxt does not parse with the {d} schema: "
                              f"{str(exc).splitlines()[0]}") from None
    seen: set[str] = set()
    for la in net.layer:
        if la.name in seen:
            raise StageFailed(f"{what}: two layers are named {la.name!r}")
        seen.add(la.name)
    defined = set(net.input)
    for la in net.layer:
        for b in la.bottom:
            if b not in defined:
                raise StageFailed(f"{what}: layer {la.name!r} [{la.type}] reads blob {b!r} before any layer produces it")
        defined.update(la.top)
    origins = {la.origin for la in cn.layers}
    lost = sorted(weighted - origins - cn.removed)
    if lost:
        raise StageFailed(f"{what}: layer(s) {', '.join(lost)} carried weights but are gone; remove_node drops "
                          "weights only for layers it removes on purpose")
    try:
        shapes = infer_shapes(cn, input_shape)
    except ValueError as exc:
        raise StageFailed(f"{what}: the patched net's shapes do not fit: {exc}") from None
    for la in cn.layers:
        src = (weights or {}).get(la.origin) if la.origin is not None else None
        if src is None or not len(src.blobs):
            continue
        want = expected_blob_shapes(la, shapes.get(id(la.bottoms[0])) if la.bottoms else None)
        have = [_blob_shape(b) for b in src.blobs]
        if want is not None and not (len(want) == len(have)
                                     and all(_same_shape(w, h, b.HasField("shape"))
                                             for w, h, b in zip(want, have, src.blobs))):
            raise StageFailed(f"{what}: layer {la.label()} now needs weights of shape "
                              f"{', '.join(str(list(w)) for w in want)} but has {', '.join(str(list(h)) for h in have)}")
    return net, text


def rebuild_caffemodel(cn: CaffeNet, net: Any, weights: Any) -> Any:
    """The caffemodel for the patched net: each layer's entry follows its layer (renames, order)."""
    entries = {la.name: la for la in weights.layer}
    full = any(len(la.bottom) or len(la.top) for la in weights.layer)
    out = type(weights)()
    out.CopyFrom(weights)
    out.ClearField("layer")
    used: set[str] = set()
    for cl, msg in zip(cn.layers, net.layer):
        src = entries.get(cl.origin) if cl.origin is not None else None
        if src is None:
            continue
        used.add(cl.origin)
        e = out.layer.add()
        if full:
            e.CopyFrom(msg)
            e.blobs.extend(src.blobs)
        else:
            e.CopyFrom(src)
            e.name = msg.name
            if len(src.bottom) or len(src.top):
                del e.bottom[:]
                e.bottom.extend(msg.bottom)
                del e.top[:]
                e.top.extend(msg.top)
    # entries the prototxt never named stay as they were, unless a layer now has their name (Caffe would
    # copy their blobs into it)
    current = {c.origin for c in cn.layers} | {m.name for m in net.layer}
    for la in weights.layer:
        if la.name not in used and la.name not in cn.removed and la.name not in current:
            out.layer.add().CopyFrom(la)
    return out
