"""Self-checks of ONNX artifacts: one onnxruntime run on the probe images, judged on the output's own scale.

Every stage that makes or rewrites an ONNX graph (onnx.export, onnx.simplify, onnx.patch after each patch,
precision.fp16/int8) runs it here before anything is written. Why these rules:

* the input is realistic (``reidbuild.probe``): a model may legitimately overflow on uniform noise;
* a non-finite output is the tool's fault only where the graph it started from (PyTorch, or the ONNX before
  the step) is finite on the same image. Where that reference is non-finite too, it is the model's own
  behaviour: the step is not blamed, the image is named in the stage's log and lock record, and parity (which
  fails on any NaN/Inf in the reference or the backend) reports it if it happens on a parity image;
* two graphs that should compute the same function are compared relative to the output's scale
  (``compare.scaled_difference``: max |a - b| / max |b|) against ``SCALE_BOUND``, never with an absolute
  tolerance: features of 1e9 differ by 1e4 in float32 noise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from .compare import scaled_difference
from .errors import StageFailed
from .probe import Probe

# largest max|a - b| / max|b| accepted between graphs that compute the same function in float32: fp32 noise
# measured 1e-7..1.3e-5 (the latter: a GeM-P R50-ibn whose outputs reach 3.5e9); a broken rewrite gives ~1
SCALE_BOUND = 1e-4

Adapt = Callable[[np.ndarray], np.ndarray]


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:500]


def open_session(model: Union[bytes, Path], what: str) -> Any:
    """An onnxruntime CPU session on ``model`` (bytes, or a file onnxruntime reads itself); StageFailed names
    ``what`` when onnxruntime refuses it."""
    import onnxruntime as ort

    from .backends.onnxruntime import session_options

    try:
        return ort.InferenceSession(str(model) if isinstance(model, Path) else model, session_options(),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"{what}: onnxruntime cannot load the model: {_first_line(exc)}") from None


def batch_of(images: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` images, repeated in order when there are fewer (a graph with a fixed batch size)."""
    idx = np.arange(n) % len(images)
    return images[idx]


def input_feeds(sess: Any, images: np.ndarray, adapt: Optional[Adapt] = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Feeds for one run at batch ``len(images)``: the first input gets the images (``adapt``, or converted by
    its declared type: uint8 NHWC takes BGR bytes); any other input gets zeros. Also returns the values given
    to symbolic dims, so callers can check declared output shapes."""
    from .backends.inputs import adapt_input, graph_layout

    feeds: dict[str, np.ndarray] = {}
    params: dict[str, int] = {}
    for k, arg in enumerate(sess.get_inputs()):
        shape = list(arg.shape)
        if k == 0:
            x = adapt(images) if adapt else adapt_input(graph_layout(arg.type, shape), images)
        else:
            dims = [d if isinstance(d, int) else (len(images) if i == 0 else 1) for i, d in enumerate(shape)]
            x = np.zeros(dims, dtype=_NP_TYPES.get(arg.type, np.float32))
        for d, v in zip(shape, x.shape):
            if isinstance(d, str) and d:
                params[d] = int(v)
        feeds[arg.name] = x
    return feeds, params


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32,
             "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def run_outputs(sess: Any, images: np.ndarray, what: str,
                adapt: Optional[Adapt] = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """All outputs of one run on exactly this batch, by name, and the symbolic dims' values."""
    feeds, params = input_feeds(sess, images, adapt)
    try:
        outs = sess.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"{what}: onnxruntime cannot run the model (batch {len(images)}): {_first_line(exc)}") from None
    return {o.name: r for o, r in zip(sess.get_outputs(), outs)}, params


def features(model: Union[bytes, Path], images: np.ndarray, what: str, adapt: Optional[Adapt] = None) -> np.ndarray:
    """float64 [N, D] features of every probe image (output ``output``, else the first) of ``model`` (bytes or
    a file), honouring a fixed batch size: images go in chunks of that size, the last chunk filled up by
    repeating images."""
    sess = open_session(model, what)
    dim0 = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
    step = dim0 if isinstance(dim0, int) and dim0 > 0 else len(images)
    names = [o.name for o in sess.get_outputs()]
    key = "output" if "output" in names else names[0]
    rows = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step]
        outs, _ = run_outputs(sess, batch_of(chunk, step), what, adapt)
        rows.append(np.asarray(outs[key], dtype=np.float64).reshape(step, -1)[:len(chunk)])
    return np.concatenate(rows, axis=0)


def nonfinite_rows(values: np.ndarray) -> list[int]:
    """Indices of the images whose output holds NaN or Inf."""
    x = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    return [int(i) for i in np.flatnonzero(~np.all(np.isfinite(x), axis=1))]


def judge_finite(out: np.ndarray, probe: Probe, what: str, reference: Callable[[], np.ndarray],
                 reference_name: str) -> list[str]:
    """Fail where ``out`` is non-finite but ``reference`` (computed only if needed) is finite on the same
    image; return notes naming the images where both are non-finite (the model's own, not this step's)."""
    bad = nonfinite_rows(out)
    if not bad:
        return []
    ref_bad = set(nonfinite_rows(reference()))
    ours = [i for i in bad if i not in ref_bad]
    if ours:
        raise StageFailed(f"{what}: onnxruntime gives non-finite outputs on {probe.names[ours[0]]} "
                          f"({len(ours)} of {len(out)} {probe.source}) where {reference_name} gives finite ones")
    return [f"{reference_name} gives non-finite features on {probe.names[i]} too (the model's own behaviour, "
            "not this step's)" for i in bad]


def check_same(after: np.ndarray, before: np.ndarray, probe: Probe, what: str, bound: float = SCALE_BOUND) -> float:
    """``after`` must compute ``before`` (same graph rewritten): finite wherever ``before`` is, and within
    ``bound`` of the output's scale on those images. Returns the scaled difference (0.0 when nothing compares)."""
    judge_finite(after, probe, what, lambda: before, "the graph before this step")
    rows = [i for i in range(len(before)) if i not in set(nonfinite_rows(before))]
    if not rows:
        return 0.0
    a, b = np.asarray(after)[rows], np.asarray(before)[rows]
    rel = scaled_difference(b, a)
    if not rel <= bound:
        diff = float(np.max(np.abs(a - b)))
        raise StageFailed(f"{what}: the result differs from the graph before this step by {rel:.3g} of the output's "
                          f"scale on the {probe.source} (max abs diff {diff:.3g}, max |value| "
                          f"{float(np.max(np.abs(b))):.3g}; bound {bound:g})")
    return rel
