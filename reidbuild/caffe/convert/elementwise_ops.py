"""Op handlers for element-wise maths: activations, powers, clipping, softmax and broadcast arithmetic.

Broadcasts map to Caffe's Scale layer only over a contiguous run of axes; a constant scalar becomes a
Power layer. An ONNX Expand stays lazy (no blob) until an element-wise product or sum consumes it.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import numpy as np

from ...errors import StageFailed
from ..shapes import Shape
from .net import Lazy, Params, attrs, f32, norm_axis
from .walk import Converter, Handler


def _unary(cv: Converter, type_: str, params: Optional[Params] = None) -> Callable[[Any], None]:
    """A handler for a one-input activation that is one Caffe layer of the same shape."""
    def handler(node: Any) -> None:
        x = cv.blob(node.input[0])
        cv.set(node.output[0], cv.emit(type_, [x], node.output[0], cv.net.shapes[x], params))
    return handler


def op_relu(cv: Converter, node: Any) -> None:
    _unary(cv, "ReLU")(node)


def op_leaky_relu(cv: Converter, node: Any) -> None:
    _unary(cv, "ReLU", {"relu_param": {"negative_slope": f32(attrs(node).get("alpha", 0.01))}})(node)


def op_sigmoid(cv: Converter, node: Any) -> None:
    _unary(cv, "Sigmoid")(node)


def op_tanh(cv: Converter, node: Any) -> None:
    _unary(cv, "TanH")(node)


def op_exp(cv: Converter, node: Any) -> None:
    _unary(cv, "Exp")(node)


def op_log(cv: Converter, node: Any) -> None:
    _unary(cv, "Log")(node)


def op_abs(cv: Converter, node: Any) -> None:
    _unary(cv, "AbsVal")(node)


def op_sqrt(cv: Converter, node: Any) -> None:
    """Sqrt as Power(power=0.5): Caffe has no Sqrt layer."""
    cv.set(node.output[0], cv.power(cv.blob(node.input[0]), node.output[0], power=0.5))


def op_reciprocal(cv: Converter, node: Any) -> None:
    """1/x as Power(power=-1)."""
    cv.set(node.output[0], cv.power(cv.blob(node.input[0]), node.output[0], power=-1.0))


def op_neg(cv: Converter, node: Any) -> None:
    """-x as Power(scale=-1)."""
    cv.set(node.output[0], cv.power(cv.blob(node.input[0]), node.output[0], scale=-1.0))


def op_pow(cv: Converter, node: Any) -> None:
    """x ** e for a constant scalar exponent (Power); a computed exponent has no stock form."""
    if node.input[0] in cv.consts:
        raise cv.refuse("a constant raised to a computed power")
    e = cv.scalar(node.input[1], "the exponent")
    x = cv.blob(node.input[0])
    out_shape = tuple(np.broadcast_shapes(cv.net.shapes[x], cv.consts[node.input[1]].shape))
    x = cv.view(x, out_shape)
    cv.set(node.output[0], cv.power(x, node.output[0], power=e))


def op_clip(cv: Converter, node: Any) -> None:
    """Clip from ReLU and Power only (stock Caffe 1.0 has no Clip): max via relu(x - lo) + lo, min via hi - relu(hi - x)."""
    a = attrs(node)
    lo = a.get("min")
    hi = a.get("max")
    if len(node.input) > 1 and node.input[1]:
        lo = cv.scalar(node.input[1], "the minimum")
    if len(node.input) > 2 and node.input[2]:
        hi = cv.scalar(node.input[2], "the maximum")
    x = cv.blob(node.input[0])
    out = node.output[0]
    shape = cv.net.shapes[x]
    if lo is None and hi is None:
        cv.set(out, x)
        return
    cur = x
    if lo is not None:
        # max(x, lo) = relu(x - lo) + lo   (ReLU alone when lo == 0)
        if lo != 0:
            cur = cv.power(cur, out, shift=-lo, suffix="min_shift")
        last = hi is None and lo == 0
        cur = cv.emit("ReLU", [cur], out, shape, suffix="" if last else "min_relu")
        if lo != 0:
            cur = cv.power(cur, out, shift=lo, suffix="" if hi is None else "min_unshift")
    if hi is not None:
        # min(x, hi) = hi - relu(hi - x)
        cur = cv.power(cur, out, scale=-1.0, shift=hi, suffix="max_flip")
        cur = cv.emit("ReLU", [cur], out, shape, suffix="max_relu")
        cur = cv.power(cur, out, scale=-1.0, shift=hi)
    cv.set(out, cur)


def op_softmax(cv: Converter, node: Any) -> None:
    """Softmax; before opset 13 ONNX flattens to 2-D at ``axis``, which a view reproduces."""
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    r = len(s)
    default = -1 if cv.opset >= 13 else 1
    axis = norm_axis(attrs(node).get("axis", default), r)
    out = node.output[0]
    if cv.opset >= 13 or axis == r - 1:
        cv.set(out, cv.emit("Softmax", [x], out, s, {"softmax_param": {"axis": axis}}))
        return
    v = cv.view(x, (math.prod(s[:axis]), math.prod(s[axis:])))
    y = cv.emit("Softmax", [v], out, cv.net.shapes[v], {"softmax_param": {"axis": 1}}, suffix="2d")
    cv.output_view(out, y, s)


def op_prelu(cv: Converter, node: Any) -> None:
    """PReLU with one shared or per-channel slope (the only forms Caffe's PReLU has)."""
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    slope = cv.const(node.input[1], "the slope")
    if slope.size == 1:
        params, blob = {"prelu_param": {"channel_shared": True}}, slope.reshape(1)
    else:
        full = np.broadcast_to(slope, np.broadcast_shapes(slope.shape, s))
        if len(s) < 2 or slope.size != s[1] or full.shape != s:
            raise cv.refuse(f"PReLU slopes of shape {list(slope.shape)} are not per-channel")
        params, blob = {}, slope.reshape(-1)
    cv.set(node.output[0], cv.emit("PReLU", [x], node.output[0], s, params, [blob]))


def _binary(cv: Converter, node: Any, op: str) -> None:
    """Add/Sub/Mul/Div: constant operands, lazy broadcasts and two computed blobs each have their own form."""
    a, b = node.input[0], node.input[1]
    out = node.output[0]
    sa, sb = cv.shape(a), cv.shape(b)
    out_shape = tuple(np.broadcast_shapes(sa, sb))
    ca, cb = a in cv.consts, b in cv.consts
    if ca and cb:  # both constant: folded before reaching here
        raise StageFailed("internal error: constant binary op not folded")
    if ca or cb:
        _binary_const(cv, node, op, a, b, out_shape)
        return
    la, lb = cv.lazy.get(a), cv.lazy.get(b)
    if la is not None and la.kind == "matmul":
        cv.blob(a)  # raises the refusal for an unmaterialised product
    if lb is not None and lb.kind == "matmul":
        cv.blob(b)
    xa = la.blob if la else cv.blob(a)
    xb = lb.blob if lb else cv.blob(b)
    _binary_blobs(cv, op, xa, xb, out, out_shape)


def _binary_blobs(cv: Converter, op: str, xa: str, xb: str, out: str, out_shape: Shape) -> None:
    """Two computed operands: Eltwise when the shapes agree, else a broadcast product as Caffe's two-bottom Scale."""
    sa, sb = cv.net.shapes[xa], cv.net.shapes[xb]
    r = len(out_shape)
    pa = (1,) * (r - len(sa)) + sa
    pb = (1,) * (r - len(sb)) + sb
    if pa == pb == out_shape:
        xa, xb = cv.view(xa, out_shape), cv.view(xb, out_shape)
        if op == "Add":
            y = cv.emit("Eltwise", [xa, xb], out, out_shape, {"eltwise_param": {"operation": "SUM"}})
        elif op == "Sub":
            y = cv.emit("Eltwise", [xa, xb], out, out_shape,
                          {"eltwise_param": {"operation": "SUM", "coeff": [1.0, -1.0]}})
        elif op == "Mul":
            y = cv.emit("Eltwise", [xa, xb], out, out_shape, {"eltwise_param": {"operation": "PROD"}})
        else:  # Div
            inv = cv.power(xb, out, power=-1.0, suffix="reciprocal")
            y = cv.emit("Eltwise", [xa, inv], out, out_shape, {"eltwise_param": {"operation": "PROD"}})
        cv.set(out, y)
        return
    # one operand broadcast over the other: Caffe's two-bottom Scale (products) only
    if op not in ("Mul", "Div"):
        raise cv.refuse(f"{op} of computed tensors {list(sa)} and {list(sb)} needs a broadcast sum "
                        "(only broadcast products map to Caffe's Scale layer)")
    if op == "Div":
        if pa != out_shape:
            raise cv.refuse(f"Div broadcasting the dividend {list(sa)} to {list(out_shape)}")
        xb = cv.power(xb, out, power=-1.0, suffix="reciprocal")
    big, small = (xa, xb) if pa == out_shape else (xb, xa)
    ps = pb if big == xa else pa
    if cv.net.shapes[big] != out_shape and (1,) * (r - len(cv.net.shapes[big])) + cv.net.shapes[big] != out_shape:
        raise cv.refuse(f"{op} of {list(sa)} and {list(sb)}: both operands need broadcasting")
    rng = _span(ps, out_shape)
    if rng is None:
        raise cv.refuse(f"{op} broadcast of {list(ps)} over {list(out_shape)} is not a contiguous "
                        "run of axes (Caffe's Scale layer cannot express it)")
    lo, hi = rng
    big = cv.view(big, out_shape)
    small = cv.view(small, out_shape[lo:hi])
    cv.set(out, cv.emit("Scale", [big, small], out, out_shape, {"scale_param": {"axis": lo}}))


def _binary_const(cv: Converter, node: Any, op: str, a: str, b: str, out_shape: Shape) -> None:
    """One constant operand: a scalar becomes Power, a tensor a Scale (with bias for sums) over its contiguous axes."""
    out = node.output[0]
    const_first = a in cv.consts
    cname, xname = (a, b) if const_first else (b, a)
    c = cv.consts[cname].astype(np.float64)
    if xname in cv.lazy:
        lz = cv.lazy[xname]
        if lz.kind == "matmul" and c.size == 1 and op in ("Mul", "Div") and not (op == "Div" and const_first):
            v = float(c.reshape(-1)[0])
            cv.lazy[out] = Lazy("matmul", tuple(np.broadcast_shapes(lz.shape, c.shape)), lz.node,
                                   left=lz.left, right=lz.right, scale=lz.scale * (v if op == "Mul" else 1.0 / v))
            if cv.lazy[out].shape != lz.shape:
                raise cv.refuse("a constant that changes the rank of a MatMul result")
            return
    x = cv.blob(xname)
    sx = cv.net.shapes[x]
    r = len(out_shape)
    if (1,) * (r - len(sx)) + sx != out_shape:
        raise cv.refuse(f"a constant of shape {list(c.shape)} broadcasts the computed tensor {list(sx)}")
    x = cv.view(x, out_shape)
    if c.size == 1:
        v = float(c.reshape(-1)[0])
        if op == "Add":
            y = cv.power(x, out, shift=v)
        elif op == "Sub":
            y = cv.power(x, out, scale=-1.0, shift=v) if const_first else cv.power(x, out, shift=-v)
        elif op == "Mul":
            y = cv.power(x, out, scale=v)
        elif const_first:  # v / x = (x / v) ** -1
            y = cv.power(x, out, power=-1.0, scale=1.0 / v)
        else:
            y = cv.power(x, out, scale=1.0 / v)
        cv.set(out, y)
        return
    pc = (1,) * (r - c.ndim) + tuple(c.shape)
    rng = _span(pc, out_shape, allow_inner_ones=True)
    if rng is None:
        raise cv.refuse(f"a constant of shape {list(c.shape)} broadcast over {list(out_shape)} is not a "
                        "contiguous run of axes")
    lo, hi = rng
    if lo == 0 and out_shape[0] != 1:
        raise cv.refuse(f"a constant of shape {list(c.shape)} varies along the batch axis")
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
        x = cv.power(x, out, power=-1.0, suffix="reciprocal")
        scale, bias = full, None
    else:
        scale, bias = 1.0 / full, None
    params: dict[str, Any] = {"axis": lo, "num_axes": hi - lo}
    blobs = [scale]
    if bias is not None:
        params["bias_term"] = True
        blobs.append(bias)
    cv.set(out, cv.emit("Scale", [x], out, out_shape, {"scale_param": params}, blobs))


def op_expand(cv: Converter, node: Any) -> None:
    """Expand stays lazy: Caffe only broadcasts inside a product, so the consumer decides."""
    src = node.input[0]
    s = cv.shape(src)
    target = [int(d) for d in cv.const(node.input[1], "the target shape").reshape(-1)]
    out = tuple(np.broadcast_shapes(s, tuple(target)))
    if out == s:
        cv.alias(node)
        return
    cv.lazy[node.output[0]] = Lazy("expand", out, cv.node_label, blob=cv.blob(src))


def _span(small: Shape, full: Shape, allow_inner_ones: bool = False) -> Optional[tuple[int, int]]:
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


HANDLERS: dict[str, Handler] = {
    "Relu": op_relu, "LeakyRelu": op_leaky_relu, "Sigmoid": op_sigmoid, "Tanh": op_tanh, "Exp": op_exp,
    "Log": op_log, "Abs": op_abs, "Sqrt": op_sqrt, "Reciprocal": op_reciprocal, "Neg": op_neg, "Pow": op_pow,
    "Clip": op_clip, "Softmax": op_softmax, "PRelu": op_prelu, "Expand": op_expand,
    # the four binary ops share one handler (see :func:`_binary`), told which op it converts
    **{op: functools.partial(_binary, op=op) for op in ("Add", "Sub", "Mul", "Div")},
}
