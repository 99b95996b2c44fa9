"""Op handlers for matrix products: Gemm and MatMul by a constant (InnerProduct), and the products of two
computed tensors that have an exact stock form (dot products, per-row scalings, a reassociated chain).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from .net import Lazy, attrs
from .walk import Converter, Handler


def op_gemm(cv: Converter, node: Any) -> None:
    """Gemm with constant weights as InnerProduct (alpha and beta folded into the blobs)."""
    a = attrs(node)
    if a.get("transA", 0):
        raise cv.refuse("Gemm with a transposed computed input")
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    w = cv.const(node.input[1], "the weights").astype(np.float64)
    if len(s) != 2 or w.ndim != 2:
        raise cv.refuse(f"Gemm of a rank-{len(s)} input")
    w = w if a.get("transB", 0) else w.T
    w = w * a.get("alpha", 1.0)
    n = w.shape[0]
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c = cv.const(node.input[2], "the bias").astype(np.float64)
        if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
            raise cv.refuse(f"a Gemm bias of shape {list(c.shape)} that is not per output")
        bias = np.broadcast_to(c.reshape(-1), (n,)) * a.get("beta", 1.0)
    _inner_product(cv, x, node.output[0], w, bias, axis=1)


def _inner_product(cv: Converter, x: str, out: str, w: np.ndarray, bias: Optional[np.ndarray], axis: int,
                   suffix: str = "") -> str:
    """An InnerProduct over the axes from ``axis`` on; binds ``out`` unless it is a helper (``suffix``)."""
    s = cv.net.shapes[x]
    p: dict[str, Any] = {"num_output": int(w.shape[0])}
    if bias is None:
        p["bias_term"] = False
    if axis != 1:
        p["axis"] = axis
    blobs = [w.astype(np.float32)] + ([np.asarray(bias, np.float32)] if bias is not None else [])
    y = cv.emit("InnerProduct", [x], out, s[:axis] + (int(w.shape[0]),), {"inner_product_param": p}, blobs,
                suffix=suffix)
    if not suffix:
        cv.set(out, y)
    return y


def op_mat_mul(cv: Converter, node: Any) -> None:
    """MatMul by a constant (InnerProduct), or of two computed tensors where an exact stock form exists
    (or a reassociated chain)."""
    a, b = node.input[0], node.input[1]
    out = node.output[0]
    if a in cv.consts:
        raise cv.refuse("a constant times a computed tensor (MatMul with a constant left operand)")
    if b in cv.consts:
        w = cv.consts[b]
        x = cv.blob(a)
        s = cv.net.shapes[x]
        if w.ndim != 2 or len(s) < 2:
            raise cv.refuse(f"MatMul of {list(s)} by a constant of shape {list(w.shape)}")
        _inner_product(cv, x, out, w.astype(np.float32).T, None, axis=len(s) - 1)
        return
    la = cv.lazy.get(a)
    if la is not None and la.kind == "matmul":
        # (P @ Q) * c @ R  ==  P @ ((Q @ R) * c): the [M, N] intermediate never exists
        r = cv.blob(b)
        qr = _matmul(cv, la.right, r, out, "reassoc_qr")
        if qr is None:
            raise cv.refuse(f"the reassociated product {list(cv.net.shapes[la.right])} x "
                            f"{list(cv.net.shapes[r])} has no Caffe form")
        if la.scale != 1.0:
            qr = cv.power(qr, out, scale=la.scale, suffix="reassoc_scale")
        y = _matmul(cv, la.left, qr, out, "")
        if y is None:
            raise cv.refuse("the reassociated product has no Caffe form")
        cv.set(out, y)
        return
    xa, xb = cv.blob(a), cv.blob(b)
    y = _matmul(cv, xa, xb, out, "")
    if y is not None:
        cv.set(out, y)
        return
    sa, sb = cv.net.shapes[xa], cv.net.shapes[xb]
    if len(sa) >= 2 and sa[-1] == 1 and _reassociable(cv, out):
        cv.lazy[out] = Lazy("matmul", tuple(sa[:-1]) + (sb[-1],), cv.node_label, left=xa, right=xb)
        return
    raise cv.refuse(f"a product of two computed tensors {list(sa)} x {list(sb)} (Caffe has no batched "
                    "matrix product; only dot products and per-row scalings map to stock layers)")


def _reassociable(cv: Converter, name: str) -> bool:
    """``name`` flows, through at most scalings by constants, into the left operand of one MatMul."""
    seen = 0
    while seen < 4:
        cons = [n for n in cv.consumers.get(name, []) if n.op_type not in ("Shape", "Size")]
        if len(cons) != 1:
            return False
        n = cons[0]
        if n.op_type == "MatMul":
            return bool(n.input[0] == name)
        if n.op_type in ("Mul", "Div"):
            other = n.input[1] if n.input[0] == name else n.input[0]
            if other not in cv.will_be_const or (n.op_type == "Div" and n.input[1] != other):
                return False
            name = n.output[0]
            seen += 1
            continue
        return False
    return False


def _matmul(cv: Converter, xa: str, xb: str, out: str, suffix: str) -> Optional[str]:
    """Blob of xa @ xb (both computed) when it has an exact stock-Caffe form, else None."""
    sa, sb = cv.net.shapes[xa], cv.net.shapes[xb]
    if len(sa) < 2 or len(sb) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
        return None
    batch = sa[:-2]
    bn = math.prod(batch)
    m, k, n = sa[-2], sa[-1], sb[-1]
    out_shape = batch + (m, n)

    def sfx(t: str) -> str:
        return f"{suffix}_{t}" if suffix else t
    if m == 1 and n == 1:  # dot product per batch entry: elementwise product, then a sum by ones
        va, vb = cv.view(xa, (bn, k)), cv.view(xb, (bn, k))
        prod = cv.emit("Eltwise", [va, vb], out, (bn, k), {"eltwise_param": {"operation": "PROD"}},
                       suffix=sfx("dot_prod"))
        y = _inner_product(cv, prod, out, np.ones((1, k), np.float32), None, axis=1, suffix=sfx("dot_sum"))
        return cv.view(y, out_shape)
    if k == 1 and (n == 1 or m == 1):  # a vector times a per-batch scalar
        vec, sca, length = (xa, xb, m) if n == 1 else (xb, xa, n)
        v = cv.view(vec, (bn, 1, length))
        sc = cv.view(sca, (bn, 1))
        y = cv.emit("Scale", [v, sc], out, (bn, 1, length), {"scale_param": {"axis": 0}},
                    suffix=sfx("scale"))
        return cv.view(y, out_shape)
    return None


HANDLERS: dict[str, Handler] = {"Gemm": op_gemm, "MatMul": op_mat_mul}
