"""Clean-up passes over a converted net: name the output, fuse trivial chains, drop dead layers.

They run after the graph walk, on the plain :class:`~reidbuild.caffe.convert.net.Net` only: each pass is
exact (affine maps composed in float64, then stored as float32 like any prototxt float) and repeated
until nothing changes. Dangling Slice parts go to a Silence layer so Caffe does not print them as outputs.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from ..shapes import Shape
from .net import Layer, Net, Params, f32


def _view_params(in_shape: Shape, out_shape: Shape) -> tuple[str, Params]:
    """Reshape/Flatten parameters; the batch (axis 0) is copied (``dim: 0``) when it is unchanged."""
    if len(out_shape) == 2 and len(in_shape) > 2 and out_shape[0] == in_shape[0]:
        return "Flatten", {}
    dims = [0 if i == 0 and len(in_shape) > 0 and d == in_shape[0] else d for i, d in enumerate(out_shape)]
    return "Reshape", {"reshape_param": {"shape": {"dim": dims}}}


def finish(net: Net, out_blob: str) -> None:
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


def _free_layer_name(net: Net, base: str) -> str:
    """A layer name not used in ``net`` (the converter's name registry is gone by now)."""
    names = {l.name for l in net.layers}
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    return name


def _rename_layer(net: Net, layer: Layer, new: str) -> None:
    """Give ``layer`` the name ``new``, moving a layer that already has it out of the way."""
    for other in net.layers:
        if other.name == new:
            other.name = _free_layer_name(net, new + "_")
    layer.name = new


def _rename_blob(net: Net, old: str, new: str) -> None:
    """Rename a blob everywhere (and its shape entry), moving a blob that already has the name."""
    if old == new:
        return
    if new in net.shapes:
        _rename_blob(net, new, net.unique_blob(new + "_"))
    for l in net.layers:
        l.bottom = [new if b == old else b for b in l.bottom]
        l.top = [new if t == old else t for t in l.top]
    net.shapes[new] = net.shapes.pop(old)


def _uses(net: Net) -> dict[str, list[Layer]]:
    """Blob -> the layers reading it."""
    u: dict[str, list[Layer]] = {}
    for l in net.layers:
        for b in l.bottom:
            u.setdefault(b, []).append(l)
    return u


def _dce(net: Net) -> bool:
    """Drop layers that do not lead to ``output`` (the Input layer always stays); True when any was dropped."""
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


def _producer(net: Net) -> dict[str, Layer]:
    """Blob -> the layer writing it."""
    return {t: l for l in net.layers for t in l.top}


def _fusable_pairs(net: Net, kind: str) -> Iterator[tuple[Layer, Optional[Layer]]]:
    """Each ``kind`` layer with the layer of the same kind feeding it when that one can merge into it (its top
    goes to this layer alone and is not the net's output), else None."""
    uses, prod = _uses(net), _producer(net)
    for l in net.layers:
        if l.type != kind:
            continue
        src = l.bottom[0]
        p = prod.get(src)
        ok = p is not None and p.type == kind and len(uses.get(src, [])) == 1 and src != "output"
        yield l, p if ok else None


def _fuse_views(net: Net) -> bool:
    """Reshape of a Reshape -> one Reshape; a Reshape to the same shape -> nothing."""
    for l, p in _fusable_pairs(net, "Reshape"):
        src = l.bottom[0]
        if p is not None:
            l.bottom = [p.bottom[0]]
            return True
        if net.shapes[src] == net.shapes[l.top[0]] and l.top[0] != "output":
            top = l.top[0]
            for other in net.layers:
                other.bottom = [src if b == top else b for b in other.bottom]
            return True
    return False


def _fuse_power(net: Net) -> bool:
    """Power(power=1) followed by Power -> one Power (an affine map composed into the next)."""
    for l, p in _fusable_pairs(net, "Power"):
        if p is None:
            continue
        a, b = p.params["power_param"], l.params["power_param"]
        if a.get("power", 1.0) != 1.0:
            continue
        s1, h1 = a.get("scale", 1.0), a.get("shift", 0.0)
        s2, h2 = b.get("scale", 1.0), b.get("shift", 0.0)
        merged = {k: v for k, v in (("power", b.get("power", 1.0)), ("scale", f32(s1 * s2)),
                                    ("shift", f32(h1 * s2 + h2))) if v != (1.0 if k != "shift" else 0.0)}
        l.params = {"power_param": merged}
        l.bottom = [p.bottom[0]]
        return True
    return False


def _fuse_scale(net: Net) -> bool:
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

