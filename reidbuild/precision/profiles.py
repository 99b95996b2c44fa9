"""Default parity tolerances per check; the manifest's parity section and ``parity.overrides`` refine them.

fp32 artifacts (onnxruntime, caffe, an fp32 TensorRT engine) must match PyTorch elementwise: rtol 1e-3,
atol 1e-5 on the L2-normalised features (``parity.compare: normalized``, what the old procedure's
``assert_allclose`` compared; its atol 1e-6 is below the float32 noise of deep IBN models: fast-reid-built
R101-ibn models with trained-like weights put single near-zero elements 2e-6 to 5e-6 off, while every
corruption the tests make needs an atol above 1e-4 to pass), plus cosine >= 0.9999 and full rank-1 / top-5 agreement
(float32 noise gives cosine 1 - 1e-10 and moves no neighbour beyond a tie; any real error costs far more).
Reduced precision cannot match elementwise, so fp16/int8 are judged on what retrieval uses: per-image cosine
and neighbour agreement (rank-1 agreement and top-5 overlap, the parity images serving as query and gallery).

The retrieval thresholds come from measurements (the tests/precision vehicle): fast-reid R18 at 256x128,
random weights with a data-calibrated BN neck, the 12 test_data images, seeds 0-2, onnxruntime CPU:
  fp16               min cosine 0.999999, rank-1 1.000, top-5 1.000 (every seed)
  int8 good calib.   min cosine 0.991-0.995, rank-1 0.917-1.000, top-5 0.967-1.000 (minmax, percentile)
  int8 one black img min cosine 0.980-0.983, rank-1 0.833-1.000, top-5 0.933-0.983
fp16 allows no rank-1 flip on a 12-image set (0.95); int8 allows one flip in 12 with margin (0.85). The
per-image cosine is the check that separates a good calibration from a bad one; the retrieval thresholds
are a backstop against reordering that a high average cosine can hide. Caveat: with init_random's own BN
neck (the shipped demo) all features share one direction, every int8 variant scores cosine > 0.999 and a
one-black-image calibration passes too; only a model whose BN neck fits its features makes this check bite.
"""
from __future__ import annotations

from typing import Any

from ..compare import FP32_TOLERANCE

_FP32: dict[str, Any] = dict(FP32_TOLERANCE)
_FP16: dict[str, Any] = {"rtol": None, "atol": None, "min_cosine": 0.999, "min_rank1": 0.95, "topk": 5,
                         "min_topk_overlap": 0.95}
_INT8: dict[str, Any] = {"rtol": None, "atol": None, "min_cosine": 0.99, "min_rank1": 0.85, "topk": 5,
                         "min_topk_overlap": 0.85}

PROFILES: dict[str, dict[str, Any]] = {"fp32": _FP32, "fp16": _FP16, "int8": _INT8}


def precision_of(check: str) -> str:
    """The precision whose profile ``check`` uses: a precision name itself, a registered target's runner
    (``reidbuild.targets``: ``onnx_fp16`` -> fp16), or ``<target or runner>_<precision>`` (``tensorrt_int8``)."""
    from .. import targets

    if check in PROFILES:
        return check
    try:
        return targets.precision_of(check)
    except KeyError:
        pass
    stem, _, precision = check.rpartition("_")
    known = set(targets.backend_names()) | {t.name for t in targets.registered()}
    if precision in PROFILES and stem in known:
        return precision
    names = sorted(set(PROFILES) | set(targets.backend_names()))
    raise ValueError(f"no default tolerance for check {check!r} (known: {', '.join(names)}, "
                     f"or <target>_<precision>)")


def default_tolerance(check: str) -> dict[str, Any]:
    """Tolerance keys (rtol, atol, min_cosine, min_rank1, topk, min_topk_overlap) for a parity check name.

    ``onnx_fp16``/``onnx_int8`` are the precision ONNX on onnxruntime; a TensorRT engine of that precision
    uses the same profile (``tensorrt_fp16``/``tensorrt_int8``, or the mode name itself), and so does the CPU int8
    ONNX (``onnx_int8_cpu``). Each target declares its runners' precisions. Unset keys are None.
    """
    return dict(PROFILES[precision_of(check)])
