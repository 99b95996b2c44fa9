"""Small ONNX graph facts shared by the fp16 and int8 recipes.

Both recipes keep the *prologue* (input normalisation before the first heavy op) and the *epilogue*
(pooling, BN neck, slicing after the last heavy op) in float32: those few cheap nodes decide the feature
values most directly, and keeping them exact costs nothing measurable.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def ensure_node_names(model: Any) -> int:
    """Give every unnamed node a deterministic unique name (block lists match by name); returns how many."""
    used = {n.name for n in model.graph.node if n.name}
    named = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            base = f"{node.op_type}_rb{i}"
            name, k = base, 0
            while name in used:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            used.add(name)
            named += 1
    return named


def prologue_epilogue(model: Any) -> tuple[list[str], list[str]]:
    """Names of the nodes before the first heavy op (no heavy ancestor) and after the last one (no heavy
    descendant), in graph order. A graph without heavy ops has every node in both."""
    nodes = list(model.graph.node)
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    # nodes are topologically sorted in a valid ONNX graph
    heavy_above = [False] * len(nodes)
    for i, n in enumerate(nodes):
        heavy_above[i] = any(
            t in producer and (nodes[producer[t]].op_type in HEAVY_OPS or heavy_above[producer[t]]) for t in n.input)
    heavy_below = [False] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        heavy_below[i] = any(
            nodes[j].op_type in HEAVY_OPS or heavy_below[j] for o in nodes[i].output for j in consumers.get(o, []))
    prologue = [n.name for i, n in enumerate(nodes) if n.op_type not in HEAVY_OPS and not heavy_above[i]]
    epilogue = [n.name for i, n in enumerate(nodes) if n.op_type not in HEAVY_OPS and not heavy_below[i]]
    return prologue, epilogue


def first_block(model: Any) -> list[str]:
    """Names of the nodes up to and including the first residual join (an Add both of whose inputs come from
    heavy ops): the stem convolution and the first residual block of a ResNet. [] when there is no such Add.

    The int8 recipe keeps these in float: on a trained-like R50 they are where int8 hurts the features most
    (stem and first block in float: min cosine 0.985 -> 0.992, for about 9% of the FLOPs).
    """
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    heavy_above = [False] * len(nodes)
    for i, n in enumerate(nodes):
        heavy_above[i] = n.op_type in HEAVY_OPS or any(t in producer and heavy_above[producer[t]] for t in n.input)
    for i, n in enumerate(nodes):
        if n.op_type == "Add" and len(n.input) == 2 and all(t in producer and heavy_above[producer[t]] for t in n.input):
            return [m.name for m in nodes[: i + 1]]
    return []


def op_counts(model: Any) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def graph_input(model: Any) -> tuple[str, int, list[Any]]:
    """(name, ONNX elem type, shape with ints or dim_param strings) of the single real graph input."""
    inits = {i.name for i in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inits]
    if len(real) != 1:
        from ..errors import StageFailed

        raise StageFailed(f"expected one graph input, found {len(real)}: {[i.name for i in real]}")
    t = real[0].type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return real[0].name, t.elem_type, shape
