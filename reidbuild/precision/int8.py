"""int8 ONNX: post-training static quantisation to Q/DQ with onnxruntime, calibrated on real images.

Recipe (what TensorRT's explicit quantisation wants, and what onnxruntime can check on the CPU):
  * QDQ format, int8 activations (symmetric, per tensor) and int8 weights (symmetric, per output channel),
    zero points all 0, biases left float (TensorRT has no int32 dequantisation);
  * the inputs of Conv/Gemm/MatMul and of residual Adds are quantised; the prologue (input normalisation),
    the stem and first residual block (``graph.first_block``: where int8 hurts a trained-like R50's features
    most) and the epilogue after the last heavy op (final Add/Relu, pooling, BN neck) stay float32;
  * ranges from onnxruntime's calibrators (entropy | percentile | minmax) run over the calibration images
    one at a time (so a ragged last batch or a static batch-1 graph needs nothing special), in chunks of
    CHUNK images to bound memory.

onnxruntime's entropy calibrator defaults (128 histogram bins, 128 quantised bins) leave the KL search a
single candidate, i.e. plain min/max; we pass ENTROPY_BINS/ENTROPY_QUANT_BINS so the search is real
(256 quantised bins = the 255 levels of symmetric int8 over the signed histogram), and run its KL search
through ``entropy_threshold``: the same arithmetic vectorised, since onnxruntime's per-bin Python loops take
~0.5 s per calibrated tensor at these sizes (30 s for a ResNet-18). Measured on the random-weight demo R18,
entropy clips post-ReLU tensors at about half their range and loses to percentile/minmax (min cosine 0.83
vs 0.99): parity, not this module, decides whether a calibration is good enough.

Reproducibility: every calibrated range is rounded outward to RANGE_BITS significant bits before the
scales are computed, so last-bit differences in the calibration forward passes (thread partitioning,
another CPU's kernels) do not change the scales and hence the bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # numpy is imported where it is used: planning reads RECIPE and QUANT_OPS on a no-op apply
    import numpy as np

from ..errors import StageFailed
from .graph import ensure_node_names, first_block, graph_input, op_counts, prologue_epilogue

RECIPE = "int8-qdq-v2"  # v2: stem and first residual block kept float
QUANT_OPS: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
METHODS = ("entropy", "percentile", "minmax")
CHUNK = 16
ENTROPY_BINS = 1024
ENTROPY_QUANT_BINS = 256
PERCENTILE_BINS = 2048
RANGE_BITS = 12


def _round_up(x: float, bits: int = RANGE_BITS) -> float:
    """Smallest value >= x with ``bits`` significant bits (exact in float32)."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1, m carries the sign
    return math.ldexp(math.ceil(m * (1 << bits)) / (1 << bits), e)


def _round_down(x: float, bits: int = RANGE_BITS) -> float:
    return -_round_up(-x, bits)


def _snap_ranges(tensors_range: Any) -> int:
    """Round every calibrated (lowest, highest) outward in place; returns how many tensors."""
    import numpy as np

    n = 0
    for _name, td in tensors_range.data.items():
        lo, hi = (np.asarray(v) for v in td.range_value)
        td.lowest = np.array([_round_down(float(v)) for v in lo.ravel()], dtype=lo.dtype).reshape(lo.shape)
        td.highest = np.array([_round_up(float(v)) for v in hi.ravel()], dtype=hi.dtype).reshape(hi.shape)
        n += 1
    return n


def entropy_threshold(histogram: Any, num_quantized_bins: int) -> tuple[Any, Any]:
    """onnxruntime's ``HistogramCollector.get_entropy_threshold`` (KL-divergence threshold search), same
    arithmetic and same result, with its per-bin Python loops replaced by numpy (5-10x faster; a ResNet-18
    calibration went from 31 s to 6.5 s).

    tests/precision/test_int8.py checks equality against onnxruntime's own method on varied histograms.
    """
    import numpy as np
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist, hist_edges = histogram[0], histogram[1]
    num_bins = hist.size
    zero_bin = num_bins // 2
    half_q = num_quantized_bins // 2
    dtype = hist_edges.dtype
    kl = np.zeros(zero_bin - half_q + 1)
    thresholds = []
    csum = np.concatenate([np.zeros(1, dtype=hist.dtype), np.cumsum(hist)])
    total = csum[-1]
    for i in range(half_q, zero_bin + 1):
        start = zero_bin - i
        end = min(zero_bin + i + 1, num_bins)
        thresholds.append((hist_edges[start], hist_edges[end]))
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += csum[start]
        p[-1] += total - csum[end]
        nonzeros = (p != 0).astype(np.int64)
        merged = sliced.size // num_quantized_bins
        body = num_quantized_bins * merged
        qbins = sliced[:body].reshape(num_quantized_bins, merged).sum(axis=1).astype(np.int64)
        qbins[-1] += sliced[body:].sum()
        norm = nonzeros[:body].reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_bin = np.where(norm != 0, qbins / np.where(norm != 0, norm, 1), 0.0)
        q[:body] = np.repeat(per_bin, merged).astype(np.int64)  # onnxruntime assigns into int64: truncates
        p = smooth_distribution(p)
        q = smooth_distribution(q)
        div = np.array(np.inf, dtype=dtype) if p is None or q is None else np.array(entropy(p, q), dtype=dtype)
        kl[i - half_q] = div
    best = thresholds[int(np.argmin(kl))]
    min_value, max_value = histogram[2], histogram[3]
    if best[0] < min_value:
        best = (min_value, best[1])
    if best[1] > max_value:
        best = (best[0], max_value)
    return best


def _entropy_collector(num_bins: int, num_quantized_bins: int) -> Any:
    from onnxruntime.quantization.calibrate import HistogramCollector

    class _FastEntropyCollector(HistogramCollector):  # type: ignore[misc]  # onnxruntime is untyped
        def get_entropy_threshold(self, histogram: Any, num_quantized_bins: int) -> Any:
            return entropy_threshold(histogram, num_quantized_bins)

    return _FastEntropyCollector(method="entropy", symmetric=True, num_bins=num_bins,
                                 num_quantized_bins=num_quantized_bins, percentile=99.999, scenario="same")


class _Reader:
    """CalibrationDataReader over preprocessed images, fed ``batch`` at a time (1 unless the graph is static)."""

    def __init__(self, name: str, images: np.ndarray, batch: int, adapt: Callable[[np.ndarray], np.ndarray]) -> None:
        self.feeds = [{name: adapt(images[i:i + batch])} for i in range(0, len(images) - batch + 1, batch)]
        self.i = 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def __len__(self) -> int:
        return len(self.feeds)


def scales_digest(model: Any) -> tuple[str, dict[str, int]]:
    """sha256 over every Q/DQ scale and zero point (name-sorted, raw bytes) + counts of what was found."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    params: dict[str, bytes] = {}
    per_channel = per_tensor = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for role, name in zip(("scale", "zero_point"), node.input[1:3], strict=False):
            if name in inits and name not in params:
                arr = numpy_helper.to_array(inits[name])
                params[name] = arr.dtype.str.encode() + arr.tobytes()
                if role == "scale":
                    if arr.size > 1:
                        per_channel += 1
                    else:
                        per_tensor += 1
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode() + b"\0" + params[name] + b"\0")
    return h.hexdigest(), {"scales_per_tensor": per_tensor, "scales_per_channel": per_channel}


def check_qdq_for_tensorrt(model: Any) -> None:
    """TensorRT explicit quantisation: int8 Q/DQ with constant scales and zero points that are 0."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            raise StageFailed(f"int8: {node.op_type} {node.name} has no constant scale")
        if len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None or zp.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zp) != 0):
                raise StageFailed(f"int8: {node.op_type} {node.name} is not symmetric int8 (zero point must be int8 0)")


def quantize_int8(model_bytes: bytes, images: Any, *, method: str = "entropy", percentile: float = 99.999,
                  workdir: Path, log: Optional[Callable[[str], None]] = None,
                  progress: Optional[Callable[[int, int], None]] = None,
                  quantize_bias: bool = False, cpu: bool = False, float_stem: bool = True,
                  adapt: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> tuple[bytes, dict[str, Any]]:
    """float32 ONNX bytes + calibration images (float32 [N,3,H,W] RGB 0..255) -> (Q/DQ ONNX bytes, record).

    ``images`` is an array or any sequence whose slices are such arrays (the precision stage passes one that
    loads image files slice by slice, so memory stays bounded by CHUNK images).

    ``quantize_bias=True`` writes onnxruntime's int32 bias Q/DQ instead of float biases: TensorRT cannot
    build that graph, so it exists only for CPU comparisons (benchmarks/bench_int8.py).

    ``float_stem=False`` quantises the stem and first residual block too (recipe v1's placement).

    ``cpu=True`` writes the graph onnxruntime's CPU kernels want instead (not for TensorRT, which needs
    symmetric activations): uint8 activations with a zero point, int32 biases. With symmetric int8
    activations onnxruntime's x86 optimizer converts each Q->DQ pair to uint8 only where the QuantizeLinear
    has one consumer, so every Conv reading a residual block's input (shared with the identity Add) stays a
    float Conv between DequantizeLinear/QuantizeLinear, as do the residual Adds, and each ReLU stays a float
    op between Q/DQ (a zero point of 0 cannot absorb it); measured on an R50: 20 of 53 Conv and 12 of 16 Add
    left in float, half of the kernel time (recipe v1; with v2's float stem: 18 of 48 quantised Conv). The uint8
    graph fuses every quantised Conv into QLinearConv.
    """
    import inspect

    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise StageFailed(f"int8: unknown calibration method {method!r} (expected one of {', '.join(METHODS)})")
    if len(images) == 0:
        raise StageFailed("int8: no calibration images")
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise StageFailed(f"int8: onnxruntime {onnxruntime.__version__} is too old: quantize_static needs "
                          "calibration_cache_path (onnxruntime >= 1.30 is known to work)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src = _prepare(model_bytes, len(images), workdir, float_stem)
    out_path = workdir / "int8.onnx"
    quiet = io.StringIO()
    ort_logger = logging.getLogger()
    old_level = ort_logger.level
    try:
        ort_logger.setLevel(logging.ERROR)  # "please run pre-processing" etc.; failures still raise
        with contextlib.redirect_stdout(quiet):
            cal = _calibrate(src, images, method, percentile, workdir, adapt, progress)
            quantize_static(
                str(src.path), str(out_path), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=src.ops,
                per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8 if cpu else QuantType.QInt8,
                nodes_to_exclude=src.keep_float, calibrate_method=_calibration_method(method),
                # biases stay float: TensorRT dequantises int8/fp8/int4/fp4, not the int32 bias onnxruntime writes
                extra_options={"ActivationSymmetric": not cpu, "WeightSymmetric": True,
                               "QuantizeBias": quantize_bias or cpu},
                calibration_cache_path=str(cal.ranges_path))
    except StageFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"int8: onnxruntime quantisation failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        ort_logger.setLevel(old_level)
    qmodel = onnx.load(str(out_path))
    if not (quantize_bias or cpu):
        check_qdq_for_tensorrt(qmodel)
    data = qmodel.SerializeToString(deterministic=True)
    if str(workdir).encode() in data:
        raise StageFailed("int8: the quantised graph mentions the scratch folder; refusing a non-reproducible artifact")
    return data, _record(qmodel, src, cal, method, percentile, cpu=cpu, quantize_bias=quantize_bias)


def _calibration_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax}[method]


@dataclass(frozen=True)
class _Source:
    """The float32 graph as quantisation sees it: written to ``path``, with its input and what stays float."""
    path: Path
    in_name: str
    in_type: str
    shape: list[Any]
    batch: int
    ops: list[str]
    keep_float: list[str]  # the epilogue's nodes, then the stem's
    stem: int


def _prepare(model_bytes: bytes, n_images: int, workdir: Path, float_stem: bool) -> _Source:
    """Read and name the source graph, find what stays float and which ops to quantise; write it for onnxruntime."""
    import onnx

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"int8: cannot read the source ONNX: {str(exc).splitlines()[0]}") from None
    ensure_node_names(model)
    _prologue, epilogue = prologue_epilogue(model)
    stem = [n for n in first_block(model) if n not in set(epilogue)] if float_stem else []
    in_name, elem, shape = graph_input(model)
    in_types: dict[int, str] = {onnx.TensorProto.FLOAT: "tensor(float)", onnx.TensorProto.UINT8: "tensor(uint8)",
                                onnx.TensorProto.FLOAT16: "tensor(float16)"}
    batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else 1
    if n_images < batch:
        raise StageFailed(f"int8: the graph has a static batch of {batch} but only {n_images} calibration images")
    src = workdir / "source.onnx"
    src.write_bytes(model.SerializeToString(deterministic=True))
    present = {n.op_type for n in model.graph.node}
    ops = [op for op in QUANT_OPS if op in present]
    if not ops:
        raise StageFailed(f"int8: the graph has none of {', '.join(QUANT_OPS)}: nothing to quantise")
    return _Source(src, in_name, in_types.get(elem, "tensor(float)"), shape, batch, ops, list(epilogue) + stem,
                   len(stem))


@dataclass(frozen=True)
class _Calibration:
    ranges_path: Path  # the snapped ranges, quantize_static's calibration cache
    used: int  # images calibrated on
    sha256: str  # of the preprocessed float32 tensors actually used
    ranges: int


def _calibrate(src: _Source, images: Any, method: str, percentile: float, workdir: Path,
               adapt: Optional[Callable[[np.ndarray], np.ndarray]],
               progress: Optional[Callable[[int, int], None]]) -> _Calibration:
    """Collect activation ranges over the images, CHUNK at a time, and write them rounded outward."""
    import numpy as np
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from ..backends.onnxruntime import adapt_input

    cal_opts: dict[str, Any] = {"symmetric": True}
    if method == "entropy":
        cal_opts.update(num_bins=ENTROPY_BINS, num_quantized_bins=ENTROPY_QUANT_BINS)
    elif method == "percentile":
        cal_opts.update(num_bins=PERCENTILE_BINS, percentile=float(percentile))
    if adapt is None:  # no graph-patch knowledge given: infer the feed from the input's declared type
        adapt = lambda b: adapt_input(b, src.in_type, src.shape)
    calibrator = create_calibrator(src.path, src.ops, augmented_model_path=str(workdir / "augmented.onnx"),
                                   calibrate_method=_calibration_method(method), extra_options=cal_opts)
    if method == "entropy":
        calibrator.collector = _entropy_collector(ENTROPY_BINS, ENTROPY_QUANT_BINS)
    batch = src.batch
    step = max(CHUNK // batch, 1) * batch
    calib_hash = hashlib.sha256()
    used = 0
    for start in range(0, len(images), step):
        chunk = np.ascontiguousarray(images[start:start + step], dtype=np.float32)
        reader = _Reader(src.in_name, chunk, batch, adapt)
        if len(reader):
            calibrator.collect_data(reader)
            kept = chunk[: len(reader) * batch]
            calib_hash.update(kept.tobytes())
            used += len(kept)
        if progress is not None:  # calibration is the long part: images done of all
            progress(min(start + step, len(images)), len(images))
    tensors_range = calibrator.compute_data()
    del calibrator
    n_ranges = _snap_ranges(tensors_range)
    ranges_path = workdir / "ranges.json"
    save_tensors_data(tensors_range, ranges_path)
    return _Calibration(ranges_path, used, calib_hash.hexdigest(), n_ranges)


def _record(qmodel: Any, src: _Source, cal: _Calibration, method: str, percentile: float, *, cpu: bool,
            quantize_bias: bool) -> dict[str, Any]:
    """What the lock records about an int8 graph: recipe, placement, calibration and the resulting scales."""
    import onnxruntime

    digest, counts = scales_digest(qmodel)
    ops_after = op_counts(qmodel)
    return {
        "quantizer": "onnxruntime.quantization.quantize_static",
        "onnxruntime": onnxruntime.__version__,
        "recipe": RECIPE,
        "format": "QDQ",
        "activations": "uint8 asymmetric per-tensor (CPU only)" if cpu else "int8 symmetric per-tensor",
        "weights": "int8 symmetric per-channel",
        "bias": "int32 (CPU only)" if quantize_bias or cpu else "float (not quantised)",
        "op_types_quantized": src.ops,
        "kept_float_nodes": len(src.keep_float),
        "kept_float_stem": src.stem,
        "calibration": {
            "method": method,
            **({"percentile": float(percentile)} if method == "percentile" else {}),
            **({"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANT_BINS} if method == "entropy" else {}),
            **({"num_bins": PERCENTILE_BINS} if method == "percentile" else {}),
            "images": cal.used,
            "images_sha256": cal.sha256,  # of the preprocessed float32 tensors actually used
            "ranges": cal.ranges,
            "range_rounding": f"outward to {RANGE_BITS} significant bits",
        },
        "scales_sha256": digest,
        **counts,
        "quantize_linear": ops_after.get("QuantizeLinear", 0),
        "dequantize_linear": ops_after.get("DequantizeLinear", 0),
    }
