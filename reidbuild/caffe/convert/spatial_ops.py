"""Op handlers over the spatial axes: convolution, pooling (local, global) and reductions.

Pooling rounding: PyTorch/ONNX round the output size down (``ceil_mode=0``), stock Caffe rounds up. The
``ceil_mode`` dialect writes the fork field; the ``bvlc`` dialect has none, so where Caffe's ceil would give an
extra row/column it is sliced off (its windows start where PyTorch's do: the values are the same). The sizes
come from :mod:`reidbuild.caffe.shapes`, which the Caffe graph patches use too.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import numpy as np

from ...errors import StageFailed
from ..shapes import Shape, caffe_pool_size, conv_size, torch_pool_size
from .net import attrs, norm_axis
from .walk import Converter, Handler


def _pads(cv: Converter, a: dict[str, Any], spatial: Shape, kernel: list[int], strides: list[int],
          dilations: list[int]) -> list[int]:
    """ONNX pads (explicit or auto_pad) as Caffe's (pad_h, pad_w); Caffe pads both sides equally."""
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(a.get("pads", [0] * 4))
    elif auto == "VALID":
        pads = [0] * 4
    else:
        pairs = []
        for d, k, st, dl in zip(spatial, kernel, strides, dilations):
            o = -(-d // st)
            total = max(0, (o - 1) * st + (k - 1) * dl + 1 - d)
            small, big = total // 2, total - total // 2
            pairs.append((small, big) if auto == "SAME_UPPER" else (big, small))
        pads = [pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]]
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise cv.refuse(f"asymmetric padding {pads} (Caffe pads both sides equally)")
    return [pads[0], pads[1]]


def op_conv(cv: Converter, node: Any) -> None:
    """2-D convolution (groups, dilation, bias) as Convolution; the output size uses Caffe's formula."""
    a = attrs(node)
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    w = cv.const(node.input[1], "the weights").astype(np.float32, copy=False)  # no copy: the blob only reads it
    if len(s) != 4 or w.ndim != 4:
        raise cv.refuse(f"only 2-D convolutions map to Caffe here (input {list(s)})")
    bias = cv.const(node.input[2], "the bias").astype(np.float32).reshape(-1) \
        if len(node.input) > 2 and node.input[2] else None
    group = int(a.get("group", 1))
    o, ig, kh, kw = w.shape
    if ig * group != s[1] or o % group:
        raise StageFailed(f"{cv.node_label}: weights {list(w.shape)} do not fit input {list(s)} with group {group}")
    strides = list(a.get("strides", [1, 1]))
    dil = list(a.get("dilations", [1, 1]))
    ph, pw = _pads(cv, a, s[2:], [kh, kw], strides, dil)
    oh = conv_size(s[2], kh, strides[0], ph, dil[0])
    ow = conv_size(s[3], kw, strides[1], pw, dil[1])
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
    cv.set(node.output[0], cv.emit("Convolution", [x], node.output[0], (s[0], o, oh, ow),
                                       {"convolution_param": p}, blobs))


def op_conv_transpose(cv: Converter, node: Any) -> None:
    """Refused: transposed convolution is not supported by this converter."""
    raise cv.refuse("transposed convolution is not supported by this converter")


def _pool(cv: Converter, node: Any, method: str) -> None:
    """Max/average pooling with PyTorch's output size: ceil_mode written (fork) or the extra row/column sliced off (bvlc)."""
    a = attrs(node)
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    if len(s) != 4:
        raise cv.refuse(f"only 2-D pooling maps to Caffe (input {list(s)})")
    if any(o and cv.consumers.get(o) for o in node.output[1:]):
        raise cv.refuse("max-pooling indices are used")
    k = list(a["kernel_shape"])
    st = list(a.get("strides", [1, 1]))
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        raise cv.refuse("dilated pooling")
    ceil = bool(a.get("ceil_mode", 0))
    pads = _pads(cv, a, s[2:], k, st, [1, 1])
    if method == "AVE" and any(pads) and not a.get("count_include_pad", 0):
        raise cv.refuse("average pooling that excludes the padding from the divisor (count_include_pad=0); "
                        "Caffe always counts it")
    if any(p >= kk for p, kk in zip(pads, k)):
        raise cv.refuse(f"padding {pads} not smaller than the kernel {k}")
    want = tuple(torch_pool_size(d, kk, ss, p, ceil) for d, kk, ss, p in zip(s[2:], k, st, pads))
    caffe_ceil = True if cv.dialect == "bvlc" else ceil
    got = tuple(caffe_pool_size(d, kk, ss, p, caffe_ceil, any(pads)) for d, kk, ss, p in zip(s[2:], k, st, pads))
    if any(g < w for g, w in zip(got, want)):
        raise cv.refuse(f"Caffe would give a {list(got)} pooling output where ONNX gives {list(want)}")
    out = node.output[0]
    if tuple(k) == tuple(s[2:]) and not any(pads) and want == (1, 1):
        p: dict[str, Any] = {"pool": method, "global_pooling": True}
    else:
        p = {"pool": method}
        _hw(p, "kernel", k[0], k[1], None)
        _hw(p, "stride", st[0], st[1], 1)
        _hw(p, "pad", pads[0], pads[1], 0)
        if cv.dialect == "ceil_mode":
            p["ceil_mode"] = ceil
    trim = got != want
    y = cv.emit("Pooling", [x], out, (s[0], s[1]) + got, {"pooling_param": p}, suffix="pool" if trim else "")
    for axis in (2, 3):
        have, keep = cv.net.shapes[y][axis], want[axis - 2]
        if have > keep:  # Caffe's extra last row/column: slice it off (its windows start where PyTorch's do)
            last = axis == 3 or got[1] == want[1]
            shape = list(cv.net.shapes[y])
            rest = list(shape)
            shape[axis], rest[axis] = keep, have - keep
            name = out if last else f"{out}/crop_h"
            tops = cv.net.add("Slice", cv.lname(f"crop_{'hw'[axis - 2]}"), [y],
                                [(name, tuple(shape)), (f"{out}/{'hw'[axis - 2]}_ceil_extra", tuple(rest))],
                                {"slice_param": {"axis": axis, "slice_point": [keep]}}, top_is_onnx=last)
            y = tops[0]
    cv.set(out, y)


def op_max_pool(cv: Converter, node: Any) -> None:
    """MaxPool (row-major indices only, and only when unused)."""
    if attrs(node).get("storage_order", 0):
        raise cv.refuse("column-major max-pooling indices")
    _pool(cv, node, "MAX")


def op_average_pool(cv: Converter, node: Any) -> None:
    """AveragePool (padding counted in the divisor, as Caffe always counts it)."""
    _pool(cv, node, "AVE")


def _global_pool(cv: Converter, node: Any, method: str) -> None:
    """Global pooling of a 3-D or 4-D tensor."""
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    if len(s) not in (3, 4):
        raise cv.refuse(f"global pooling of a rank-{len(s)} tensor")
    x4 = cv.view(x, s if len(s) == 4 else (s[0], s[1], s[2], 1))
    y = cv.emit("Pooling", [x4], node.output[0], (s[0], s[1], 1, 1),
                  {"pooling_param": {"pool": method, "global_pooling": True}},
                suffix="" if len(s) == 4 else "pool")
    cv.output_view(node.output[0], y, s[:2] + (1,) * (len(s) - 2))


def op_global_average_pool(cv: Converter, node: Any) -> None:
    """GlobalAveragePool."""
    _global_pool(cv, node, "AVE")


def op_global_max_pool(cv: Converter, node: Any) -> None:
    """GlobalMaxPool."""
    _global_pool(cv, node, "MAX")


def _reduce(cv: Converter, node: Any, method: str) -> None:
    """A reduction over adjacent non-batch axes as a Pooling layer (a sum is a mean times the count)."""
    a = attrs(node)
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    r = len(s)
    axes = cv.axes(node)
    if axes is None or not axes:
        if a.get("noop_with_empty_axes", 0):
            cv.set(node.output[0], x)
            return
        axes = list(range(r))
    ax = sorted({norm_axis(v, r) for v in axes})
    if ax != list(range(ax[0], ax[-1] + 1)):
        raise cv.refuse(f"reduction over non-adjacent axes {ax}")
    if ax[0] == 0:
        raise cv.refuse("reduction over the batch axis")
    keep = a.get("keepdims", 1)
    out_shape = tuple(1 if i in ax else d for i, d in enumerate(s)) if keep else \
        tuple(d for i, d in enumerate(s) if i not in ax)
    lo, hi = ax[0], ax[-1] + 1
    red = math.prod(s[lo:hi])
    out = node.output[0]
    last = method != "SUM"
    if r == 4 and ax == [2, 3]:
        y = cv.emit("Pooling", [x], out, (s[0], s[1], 1, 1),
                      {"pooling_param": {"pool": method if method != "SUM" else "AVE", "global_pooling": True}},
                    suffix="" if last and keep else "pool")
    else:
        v = cv.view(x, (s[0], math.prod(s[1:lo]), red, math.prod(s[hi:])))
        vs = cv.net.shapes[v]
        y = cv.emit("Pooling", [v], out, (vs[0], vs[1], 1, vs[3]),
                      {"pooling_param": {"pool": method if method != "SUM" else "AVE", "kernel_h": red,
                                         "kernel_w": 1}}, suffix="pool")
    if method == "SUM":  # a mean times the count: one extra rounding
        y = cv.power(y, out, scale=float(red), suffix="" if keep and r == 4 and ax == [2, 3] else "sum")
    cv.output_view(out, y, out_shape)


def _hw(p: dict[str, Any], key: str, h: int, w: int, default: Optional[int], repeated: bool = False) -> None:
    """Set ``key`` (equal h, w) or ``key_h``/``key_w``; skip the default. Convolution spells kernel_size."""
    name = "kernel_size" if key == "kernel" else key
    if h == w:
        if h != default:
            p[name] = [h] if repeated else h
    else:
        p[f"{key}_h"], p[f"{key}_w"] = h, w



HANDLERS: dict[str, Handler] = {
    "Conv": op_conv, "ConvTranspose": op_conv_transpose, "MaxPool": op_max_pool, "AveragePool": op_average_pool,
    "GlobalAveragePool": op_global_average_pool, "GlobalMaxPool": op_global_max_pool,
    # the three reductions share one handler (see :func:`_reduce`), told which Caffe pooling computes them
    **{op: functools.partial(_reduce, method=m) for op, m in (("ReduceMean", "AVE"), ("ReduceMax", "MAX"),
                                                               ("ReduceSum", "SUM"))},
}
