"""Blob shapes and layer geometry exactly as Caffe computes them: the one definition.

The ONNX -> Caffe converter (``reidbuild.caffe.convert``) uses these formulas to predict every blob's shape
while it builds a net, and the Caffe graph patches (``reidbuild.patches.caffe_ops``) use them to re-derive
shapes after an edit. Both must agree with each other and with libcaffe, so the arithmetic lives here once:
pooling (Caffe's float division, ceil or floor, then its clip of a window starting in the padding),
convolution, reshape (``0`` copies, ``-1`` infers), and the shapes of one layer's tops and learned blobs
read from its protobuf message. Nothing here needs a Caffe installation.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

Shape = tuple[int, ...]

# layer types whose every top has the shape of their first bottom
SAME_SHAPE = ("ReLU", "ReLU6", "PReLU", "Sigmoid", "TanH", "ELU", "Dropout", "BatchNorm", "Scale", "Bias", "Power",
              "AbsVal", "BNLL", "Exp", "Log", "Softmax", "LRN", "MVN", "Normalize", "Clip", "Swish", "Threshold",
              "HardSigmoid", "Mish", "GELU", "Split")


# ------------------------------------------------------------------------------------------ arithmetic


def torch_pool_size(d: int, k: int, s: int, p: int, ceil: bool) -> int:
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


def conv_size(d: int, k: int, s: int, p: int, dilation: int) -> int:
    """Output size of a convolution (Caffe and ONNX agree: floor division)."""
    return (d + 2 * p - (dilation * (k - 1) + 1)) // s + 1


def deconv_size(d: int, k: int, s: int, p: int, dilation: int) -> int:
    """Output size of Caffe's Deconvolution layer."""
    return (d - 1) * s - 2 * p + dilation * (k - 1) + 1


def reshape_dims(src: Shape, dims: Sequence[int], *, copy_zero: bool = True) -> Shape:
    """``src`` reshaped to ``dims``: ``0`` copies the source dimension (when ``copy_zero``, as Caffe and ONNX
    without allowzero do) and one ``-1`` takes what is left. ValueError when the element counts differ."""
    out = [src[i] if d == 0 and copy_zero else int(d) for i, d in enumerate(dims)]
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        out[out.index(-1)] = math.prod(src) // known if known else 0
    if math.prod(out) != math.prod(src):
        raise ValueError(f"cannot reshape {list(src)} to {list(dims)}")
    return tuple(out)


# ------------------------------------------------------------------------------ geometry from messages


def pool_geometry(p: Any) -> tuple[int, int, int, int, int, int]:
    """(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w) as Caffe's PoolingLayer reads them."""
    kh = p.kernel_h if p.HasField("kernel_h") else p.kernel_size
    kw = p.kernel_w if p.HasField("kernel_w") else p.kernel_size
    sh = p.stride_h if p.HasField("stride_h") else p.stride
    sw = p.stride_w if p.HasField("stride_w") else p.stride
    ph = p.pad_h if p.HasField("pad_h") else p.pad
    pw = p.pad_w if p.HasField("pad_w") else p.pad
    return int(kh), int(kw), int(sh), int(sw), int(ph), int(pw)


def rounds_up(p: Any) -> bool:
    """True when this pooling layer rounds up (BVLC always; the fork unless ceil_mode: false)."""
    return not ("ceil_mode" in p.DESCRIPTOR.fields_by_name and p.HasField("ceil_mode") and not p.ceil_mode)


def conv_geometry(c: Any) -> tuple[int, int, int, int, int, int, int, int]:
    """(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w) of a ConvolutionParameter."""
    def pick(single_h: str, single_w: str, rep: str, default: int) -> tuple[int, int]:
        vals = list(getattr(c, rep))
        h = getattr(c, single_h) if c.HasField(single_h) else (vals[0] if vals else default)
        w = getattr(c, single_w) if c.HasField(single_w) else (vals[-1] if vals else default)
        return int(h), int(w)
    kh, kw = pick("kernel_h", "kernel_w", "kernel_size", 1)
    sh, sw = pick("stride_h", "stride_w", "stride", 1)
    ph, pw = pick("pad_h", "pad_w", "pad", 0)
    dil = list(c.dilation)
    dh, dw = (int(dil[0]), int(dil[-1])) if dil else (1, 1)
    return kh, kw, sh, sw, ph, pw, dh, dw


# ------------------------------------------------------------------------------------- one layer


def _conv_shapes(t: str, m: Any, b0: Shape) -> list[Optional[Shape]]:
    c = m.convolution_param
    kh, kw, sh, sw, ph, pw, dh, dw = conv_geometry(c)
    size = conv_size if t == "Convolution" else deconv_size
    h, w = size(b0[2], kh, sh, ph, dh), size(b0[3], kw, sw, pw, dw)
    if h < 1 or w < 1:
        raise ValueError(f"output would be {h}x{w}")
    return [(b0[0], int(c.num_output), h, w)]


def _pool_shapes(m: Any, b0: Shape, n_tops: int) -> list[Optional[Shape]]:
    p = m.pooling_param
    if p.global_pooling:
        return [(b0[0], b0[1], 1, 1)] * n_tops
    kh, kw, sh, sw, ph, pw = pool_geometry(p)
    ceil = rounds_up(p)
    h = caffe_pool_size(b0[2], kh, sh, ph, ceil, bool(ph or pw))
    w = caffe_pool_size(b0[3], kw, sw, pw, ceil, bool(ph or pw))
    if h < 1 or w < 1:
        raise ValueError(f"output would be {h}x{w}")
    return [(b0[0], b0[1], h, w)] * n_tops


def _slice_shapes(m: Any, b0: Shape, n_tops: int) -> list[Optional[Shape]]:
    sp = m.slice_param
    axis = sp.axis % len(b0)
    points = [int(p) for p in sp.slice_point]
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


def _combine_shapes(t: str, m: Any, ins: list[Shape]) -> list[Optional[Shape]]:
    """Eltwise and Concat: several bottoms, one top."""
    b0 = ins[0]
    if t == "Eltwise":
        if any(s != b0 for s in ins):
            raise ValueError(f"bottom shapes differ: {', '.join(str(list(s)) for s in ins if s)}")
        return [b0]
    axis = m.concat_param.axis % len(b0)
    if any(len(s) != len(b0) or s[:axis] + s[axis + 1:] != b0[:axis] + b0[axis + 1:] for s in ins if s):
        raise ValueError("bottom shapes differ outside the concat axis")
    return [b0[:axis] + (sum(s[axis] for s in ins if s),) + b0[axis + 1:]]


def _view_shapes(t: str, m: Any, b0: Shape) -> list[Optional[Shape]]:
    """Flatten and Reshape (a Reshape over part of the axes is not followed: None)."""
    if t == "Flatten":
        a = m.flatten_param.axis % len(b0)
        e = m.flatten_param.end_axis % len(b0)
        return [b0[:a] + (math.prod(b0[a:e + 1]),) + b0[e + 1:]]
    rp = m.reshape_param
    if rp.axis != 0 or rp.num_axes != -1:
        return [None]
    dims = [int(d) for d in rp.shape.dim]
    if dims.count(-1) > 1:
        raise ValueError(f"cannot reshape {list(b0)} to {dims}")
    return [reshape_dims(b0, dims)]


def layer_shapes(m: Any, n_tops: int, ins: list[Optional[Shape]]) -> list[Optional[Shape]]:
    """Top shapes of the layer message ``m`` from its bottom shapes (None where unknown).

    ValueError (without the layer's name: the caller adds it) when the shapes are inconsistent.
    """
    t = m.type
    if t == "Input":
        shapes = [tuple(int(d) for d in s.dim) for s in m.input_param.shape]
        if len(shapes) == 1:
            shapes = shapes * n_tops
        return [shapes[i] if i < len(shapes) else None for i in range(n_tops)]
    known = [s for s in ins if s is not None]
    if len(known) != len(ins) or not ins:
        return [None] * n_tops
    b0 = known[0]
    if t in SAME_SHAPE:
        return [b0] * n_tops
    if t in ("Convolution", "Deconvolution", "Pooling") and len(b0) != 4:
        raise ValueError(f"{t} needs a 4-D input, got shape {list(b0)}")
    if t in ("Convolution", "Deconvolution"):
        return _conv_shapes(t, m, b0)
    if t == "Pooling":
        return _pool_shapes(m, b0, n_tops)
    if t == "InnerProduct":
        axis = m.inner_product_param.axis % len(b0)
        return [tuple(b0[:axis]) + (int(m.inner_product_param.num_output),)]
    if t in ("Eltwise", "Concat"):
        return _combine_shapes(t, m, known)
    if t in ("Flatten", "Reshape"):
        return _view_shapes(t, m, b0)
    if t == "Slice":
        return _slice_shapes(m, b0, n_tops)
    if t == "Silence":
        return []
    return [None] * n_tops


# ------------------------------------------------------------------------------------ learned blobs


def expected_blob_shapes(m: Any, n_bottoms: int, b0: Optional[Shape]) -> Optional[list[Shape]]:
    """The learned blobs' shapes the layer message ``m`` needs on input ``b0`` (None where not known)."""
    if b0 is None:
        return None
    t = m.type
    if t == "Convolution" and len(b0) == 4:
        c = m.convolution_param
        kh, kw = conv_geometry(c)[:2]
        shapes: list[Shape] = [(int(c.num_output), b0[1] // max(int(c.group), 1), kh, kw)]
        return shapes + [(int(c.num_output),)] if c.bias_term else shapes
    if t == "InnerProduct":
        ip = m.inner_product_param
        k = math.prod(b0[ip.axis % len(b0):])
        n = int(ip.num_output)
        shapes = [(k, n) if ip.transpose else (n, k)]
        return shapes + [(n,)] if ip.bias_term else shapes
    if t == "BatchNorm" and len(b0) >= 2:
        return [(b0[1],), (b0[1],), (1,)]
    if t == "Scale" and n_bottoms == 1 and len(b0) >= 2 and m.scale_param.axis == 1 and m.scale_param.num_axes == 1:
        return [(b0[1],), (b0[1],)] if m.scale_param.bias_term else [(b0[1],)]
    return None


def blob_shape(blob: Any) -> Shape:
    """A BlobProto's shape (its ``shape`` field, or the legacy num/channels/height/width)."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    return tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))


def same_blob_shape(want: Shape, have: Shape, has_shape: bool) -> bool:
    """Caffe's own rule (Blob::ShapeEquals): exact for shaped blobs; legacy 4-D blobs compare padded to 4-D.

    Only the element count matching is not enough: Caffe aborts the whole process on a shape mismatch.
    """
    if has_shape:
        return tuple(want) == tuple(have)

    def pad(t: Shape) -> Shape:
        return (1,) * (4 - len(t)) + tuple(t) if len(t) <= 4 else tuple(t)
    return pad(want) == pad(have)
