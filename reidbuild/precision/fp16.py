"""fp16 ONNX: onnxconverter-common's float16 converter, float32 I/O kept, sensitive parts kept in float32.

What stays float32 (everything else becomes float16, with Casts the converter inserts):
  * the prologue before the first Conv/Gemm/MatMul (the input normalisation ``(x - mean) / std``: raw
    0..255 pixels lose up to 1/16 of a grey level in fp16),
  * the epilogue after the last one (final residual Add/Relu, pooling incl. GeM's x**3, the BN neck and
    the output slicing: these set the feature values directly),
  * every normalisation op anywhere (BatchNorm/InstanceNorm in IBN, LayerNorm, ...) and the
    range-sensitive math listed in KEEP_FP32_OPS.
Numerics are then fixed by the graph's own types, which is what a strongly typed TensorRT network builds.
"""
from __future__ import annotations

import warnings
from typing import Any

from ..errors import StageFailed
from .graph import ensure_node_names, op_counts, prologue_epilogue

RECIPE = "fp16-v1"  # bump when the conversion policy changes: it is a stage parameter
KEEP_FP32_OPS: tuple[str, ...] = (
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
    "LpNormalization", "MeanVarianceNormalization",
    "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp",
)
CONVERTER_MAX = 1e4     # the converter clamps float32 constants to +-1e4 ...
CONVERTER_MIN = 1e-7    # ... and pushes |x| < 1e-7 out to +-1e-7 (fp16 subnormal range)


def _constant_clamps(model: Any) -> int:
    """How many float32 initializer values the converter will clamp (recorded; huge counts mean trouble)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    n = 0
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            a = np.abs(numpy_helper.to_array(init))
            n += int(np.count_nonzero(a > CONVERTER_MAX) + np.count_nonzero((a > 0) & (a < CONVERTER_MIN)))
    return n


def constants_to_initializers(model: Any) -> int:
    """Turn tensor-valued Constant nodes into initializers (same values, same names).

    Why: the converter rounds the output of a *blocked* Constant node to fp16 (it casts every blocked
    node's outputs to fp16 for its fp16 consumers), so ``pixel_mean``/``pixel_std`` exported as Constant
    nodes would silently become 123.6875 instead of 123.675. Initializers feeding only fp32 nodes are left
    alone. Their stale value_info entries go too: the converter retypes value_info, not initializers.
    """
    from onnx import TensorProto

    keep, moved = [], set()
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and len(node.output) == 1 and set(attrs) == {"value"}:
            t = TensorProto()
            t.CopyFrom(attrs["value"].t)
            t.name = node.output[0]
            model.graph.initializer.append(t)
            moved.add(t.name)
        else:
            keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        vis = [v for v in model.graph.value_info if v.name not in moved]
        del model.graph.value_info[:]
        model.graph.value_info.extend(vis)
    return len(moved)


def repair_outputs(model: Any) -> int:
    """Undo the converter's fp16 Cast on a graph output whose producer was kept in float32.

    onnxconverter-common 1.16 with keep_io_types=True and a blocked node producing a graph output casts
    that output to fp16 and retypes the graph output as float16 (its own output cast is then skipped):
    the exact opposite of keep_io_types. The repair drops that one Cast when its input is float32, so the
    kept-fp32 epilogue really reaches the output. Returns how many outputs were repaired.
    """
    from onnx import TensorProto

    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    fixed = 0
    for out in model.graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        prod = [n for n in model.graph.node if out.name in n.output]
        if len(prod) != 1 or prod[0].op_type != "Cast":
            continue
        cast = prod[0]
        if types.get(cast.input[0]) != TensorProto.FLOAT:
            continue
        src = cast.input[0]
        upstream = [n for n in model.graph.node if src in n.output]
        consumers = [n for n in model.graph.node if src in n.input and n is not cast]
        if len(upstream) != 1 or consumers:
            continue
        upstream[0].output[list(upstream[0].output).index(src)] = out.name
        model.graph.node.remove(cast)
        vis = [v for v in model.graph.value_info if v.name != src]
        del model.graph.value_info[:]
        model.graph.value_info.extend(vis)
        out.type.tensor_type.elem_type = TensorProto.FLOAT
        fixed += 1
    return fixed


def convert_fp16(model_bytes: bytes) -> tuple[bytes, dict[str, Any]]:
    """float32 ONNX bytes -> (fp16 ONNX bytes, record). Deterministic: same input, same bytes."""
    import onnx
    import onnxconverter_common
    from onnxconverter_common import float16

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"fp16: cannot read the source ONNX: {str(exc).splitlines()[0]}") from None
    ensure_node_names(model)
    constants_to_initializers(model)
    prologue, epilogue = prologue_epilogue(model)
    keep_nodes = sorted(set(prologue) | set(epilogue))
    clamped = _constant_clamps(model)
    op_block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(KEEP_FP32_OPS))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one warning per clamped constant: counted above instead
            converted = float16.convert_float_to_float16(
                model, keep_io_types=True, op_block_list=op_block, node_block_list=keep_nodes)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"fp16: onnxconverter-common failed: {str(exc).splitlines()[0]}") from None
    repaired = repair_outputs(converted)
    bad_io = [v.name for v in list(converted.graph.input) + list(converted.graph.output)
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16]
    if bad_io:
        raise StageFailed(f"fp16: the converter left float16 graph inputs/outputs {bad_io}; expected float32 I/O")
    try:
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"fp16: the converted model does not pass the ONNX checker: {str(exc).splitlines()[0]}") from None
    data = converted.SerializeToString(deterministic=True)
    kept = [n for n in converted.graph.node if n.op_type != "Cast" and
            (n.name in set(keep_nodes) or n.op_type in op_block)]
    record = {
        "converter": "onnxconverter-common float16.convert_float_to_float16",
        "converter_version": onnxconverter_common.__version__,
        "recipe": RECIPE,
        "keep_io_types": True,
        "fp32_nodes": len(kept),
        "fp32_ops": op_counts_list(kept),
        "fp16_nodes": sum(1 for n in converted.graph.node if n.op_type != "Cast") - len(kept),
        "casts": sum(1 for n in converted.graph.node if n.op_type == "Cast"),
        "clamped_constants": clamped,
        "repaired_outputs": repaired,
    }
    return data, record


def op_counts_list(nodes: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in nodes:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))


__all__ = ["convert_fp16", "KEEP_FP32_OPS", "RECIPE", "op_counts"]
