"""Op handlers that move or re-label data without computing: aliases, reshapes, slices, concatenation.

Stock Caffe has no Permute, so a Transpose maps only when it moves no data (a reshape in disguise).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ...errors import StageFailed
from ..shapes import reshape_dims
from .net import attrs, norm_axis
from .walk import Converter, Handler


def op_dropout(cv: Converter, node: Any) -> None:
    """Inference Dropout is the identity (its mask must be unused)."""
    if len(node.output) > 1 and node.output[1] and cv.consumers.get(node.output[1]):
        raise cv.refuse("the dropout mask is used")
    cv.alias(node)


def op_cast(cv: Converter, node: Any) -> None:
    """Only a cast to float32 is the identity in Caffe, which computes in float32 only."""
    if attrs(node).get("to") != 1:
        raise cv.refuse("Caffe computes in float32 only; casting a computed tensor to another type")
    cv.alias(node)


def op_reshape(cv: Converter, node: Any) -> None:
    """Reshape with a constant target shape (``0`` copies unless allowzero, ``-1`` infers)."""
    s = cv.shape(node.input[0])
    target = [int(d) for d in cv.const(node.input[1], "the target shape").reshape(-1)]
    try:
        out = reshape_dims(s, target, copy_zero=not attrs(node).get("allowzero", 0))
    except ValueError as exc:
        raise StageFailed(f"{cv.node_label}: {exc}") from None
    cv.reshape_to(node, out)


def op_flatten(cv: Converter, node: Any) -> None:
    """Flatten to 2-D at ``axis``."""
    s = cv.shape(node.input[0])
    axis = norm_axis(attrs(node).get("axis", 1), len(s))
    cv.reshape_to(node, (math.prod(s[:axis]), math.prod(s[axis:])))


def op_squeeze(cv: Converter, node: Any) -> None:
    """Squeeze: a reshape dropping size-1 axes."""
    s = cv.shape(node.input[0])
    axes = cv.axes(node)
    if axes is None:
        out = tuple(d for d in s if d != 1)
    else:
        ax = {norm_axis(x, len(s)) for x in axes}
        out = tuple(d for i, d in enumerate(s) if i not in ax)
    cv.reshape_to(node, out)


def op_unsqueeze(cv: Converter, node: Any) -> None:
    """Unsqueeze: a reshape inserting size-1 axes."""
    s = list(cv.shape(node.input[0]))
    axes = cv.axes(node)
    if axes is None:
        raise cv.refuse("Unsqueeze without axes")
    r = len(s) + len(axes)
    for ax in sorted(norm_axis(x, r) for x in axes):
        s.insert(ax, 1)
    cv.reshape_to(node, tuple(s))


def op_transpose(cv: Converter, node: Any) -> None:
    """Transpose only when it moves no data (size-1 axes only); stock Caffe has no Permute."""
    s = cv.shape(node.input[0])
    perm = attrs(node).get("perm", list(range(len(s)))[::-1])
    out = tuple(s[p] for p in perm)
    moved = [p for p in perm if s[p] != 1]
    if moved != sorted(moved):
        raise cv.refuse(f"Transpose {list(perm)} of {list(s)} moves data (stock Caffe has no Permute layer)")
    cv.reshape_to(node, out)


def op_concat(cv: Converter, node: Any) -> None:
    """Concat along one axis."""
    xs = [cv.blob(i) for i in node.input]
    shapes = [cv.net.shapes[x] for x in xs]
    r = len(shapes[0])
    axis = norm_axis(attrs(node)["axis"], r)
    out_shape = list(shapes[0])
    out_shape[axis] = sum(s[axis] for s in shapes)
    if len(xs) == 1:
        cv.set(node.output[0], xs[0])
        return
    cv.set(node.output[0], cv.emit("Concat", xs, node.output[0], tuple(out_shape),
                                       {"concat_param": {"axis": axis}}))


def _slice_parts(cv: Converter, x: str, axis: int, points: list[int], outs: list[Optional[str]]) -> list[str]:
    """Caffe Slice of ``x`` at ``points`` along ``axis``; ``outs`` names the ONNX tensor of each part."""
    s = cv.net.shapes[x]
    bounds = [0] + points + [s[axis]]
    tops = []
    for i, o in enumerate(outs):
        shp = list(s)
        shp[axis] = bounds[i + 1] - bounds[i]
        tops.append((o if o else cv.net.unique_blob(f"{cv.node.output[0]}/part{i}"), tuple(shp)))
    name = cv.lname() if all(outs) else cv.lname(f"slice{axis}")
    return cv.net.add("Slice", name, [x], tops, {"slice_param": {"axis": axis, "slice_point": points}},
                      top_is_onnx=True)


def op_split(cv: Converter, node: Any) -> None:
    """Split as one Slice layer (equal parts by default, as ONNX splits)."""
    a = attrs(node)
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    axis = norm_axis(a.get("axis", 0), len(s))
    n = len(node.output)
    if "split" in a:
        sizes = list(a["split"])
    elif len(node.input) > 1 and node.input[1]:
        sizes = [int(v) for v in cv.const(node.input[1], "the split sizes").reshape(-1)]
    else:
        step = -(-s[axis] // n)
        sizes = [min(step, s[axis] - i * step) for i in range(n)]
    if n == 1:
        cv.set(node.output[0], x)
        return
    points = list(np.cumsum(sizes[:-1]).astype(int))
    tops = _slice_parts(cv, x, axis, [int(p) for p in points], list(node.output))
    for o, t in zip(node.output, tops):
        cv.set(o, t)


def _take(cv: Converter, x: str, axis: int, start: int, end: int, out: Optional[str]) -> str:
    """Elements [start, end) of ``x`` along ``axis`` (the rest goes to Silence)."""
    s = cv.net.shapes[x]
    if start == 0 and end == s[axis]:
        return x
    points = [p for p in (start, end) if 0 < p < s[axis]]
    outs: list[Optional[str]] = [None] * (len(points) + 1)
    outs[1 if start > 0 else 0] = out
    tops = _slice_parts(cv, x, axis, points, outs)
    return tops[1 if start > 0 else 0]


def op_slice(cv: Converter, node: Any) -> None:
    """Slice with constant bounds and step 1, one Caffe Slice per cut axis (unused parts are silenced)."""
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    r = len(s)
    if cv.opset < 10:
        a = attrs(node)
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = [int(v) for v in cv.const(node.input[1], "starts").reshape(-1)]
        ends = [int(v) for v in cv.const(node.input[2], "ends").reshape(-1)]
        axes = [int(v) for v in cv.const(node.input[3], "axes").reshape(-1)] \
            if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
        steps = [int(v) for v in cv.const(node.input[4], "steps").reshape(-1)] \
            if len(node.input) > 4 and node.input[4] else [1] * len(starts)
    cuts = []
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax = norm_axis(ax, r)
        b, e, step = slice(st, en, sp).indices(s[ax])
        if step != 1:
            raise cv.refuse(f"strided slicing (step {sp})")
        if e <= b:
            raise cv.refuse("an empty slice")
        if (b, e) != (0, s[ax]):
            cuts.append((ax, b, e))
    if not cuts:
        cv.set(node.output[0], x)
        return
    for i, (ax, b, e) in enumerate(cuts):
        x = _take(cv, x, ax, b, e, node.output[0] if i == len(cuts) - 1 else None)
    cv.set(node.output[0], x)


def op_gather(cv: Converter, node: Any) -> None:
    """Gather of constant contiguous indices as a Slice (plus a view when the axis is dropped)."""
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    axis = norm_axis(attrs(node).get("axis", 0), len(s))
    idx = cv.const(node.input[1], "the indices").astype(np.int64)
    if idx.ndim > 1:
        raise cv.refuse("gathering with multi-dimensional indices")
    flat = [int(i) + s[axis] if i < 0 else int(i) for i in idx.reshape(-1)]
    if not flat or flat != list(range(flat[0], flat[0] + len(flat))):
        raise cv.refuse(f"gathering non-contiguous indices {flat}")
    if axis == 0 and s[0] != 1:
        raise cv.refuse("gathering along the batch axis")
    y = _take(cv, x, axis, flat[0], flat[-1] + 1, None if idx.ndim == 0 else node.output[0])
    out_shape = list(s)
    if idx.ndim == 0:
        del out_shape[axis]
    else:
        out_shape[axis] = len(flat)
    cv.output_view(node.output[0], y, tuple(out_shape))


HANDLERS: dict[str, Handler] = {
    "Identity": Converter.alias, "Dropout": op_dropout, "Cast": op_cast, "Reshape": op_reshape,
    "Flatten": op_flatten, "Squeeze": op_squeeze, "Unsqueeze": op_unsqueeze, "Transpose": op_transpose,
    "Concat": op_concat, "Split": op_split, "Slice": op_slice, "Gather": op_gather,
}
