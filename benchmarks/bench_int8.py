"""onnxruntime CPU throughput and fidelity: fp32 ONNX vs the two int8 Q/DQ graphs reidbuild can write.

  * "int8 TensorRT graph": what the precision.int8 stage writes for TensorRT (symmetric int8 activations,
    float biases, stem and first residual block float);
  * "int8 CPU graph": ``quantize_int8(..., cpu=True)`` (uint8 activations, int32 biases), which onnxruntime's
    CPU optimizer fuses into QLinearConv everywhere.

Model: the trained-like R50 of benchmarks/project.py (or any fp32 ONNX given with --onnx), calibrated with the
default percentile method on 32 person-like images; parity (min cosine vs fp32) on 12 other images. Also
printed: how many Conv/Add nodes onnxruntime runs as int8 kernels after its graph optimisation.

    .venv/bin/python benchmarks/bench_int8.py [--onnx model.onnx] [--seconds 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def session(data: bytes, optimized: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def images_per_second(run, batch: np.ndarray, seconds: float) -> float:
    run(batch)
    n, t0 = 0, time.perf_counter()
    while True:
        run(batch)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 3:
            return n * len(batch) / dt


def kernel_counts(optimized: Path) -> dict[str, int]:
    import onnx

    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return {k: ops.get(k, 0) for k in ("QLinearConv", "Conv", "QLinearAdd", "Add")}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def int8_figures(fp32: bytes, seconds: float, rounds: int, out=print) -> dict[str, float]:
    """Quantise ``fp32`` both ways, print kernels, fidelity and interleaved best-of-``rounds`` throughput."""
    from reidbuild.precision import int8
    from reidbuild.testing import person_like_images

    calib = person_like_images(32, 256, 128, seed=5)
    test = person_like_images(12, 256, 128, seed=9)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        models = {"fp32": fp32}
        t0 = time.perf_counter()
        models["int8 TensorRT graph"], _ = int8.quantize_int8(fp32, calib, method="percentile", workdir=root / "t")
        models["int8 CPU graph"], _ = int8.quantize_int8(fp32, calib, method="percentile", workdir=root / "c", cpu=True)
        out(f"[int8] quantised both graphs (32 calibration images, percentile) in {time.perf_counter() - t0:.1f} s")
        sessions = {k: session(v, root / f"opt{i}.onnx") for i, (k, v) in enumerate(models.items())}
        ref = sessions["fp32"].run(None, {"input": test})[0]
        for i, (label, sess) in enumerate(sessions.items()):
            cos = min_cosine(sess.run(None, {"input": test})[0], ref)
            if label != "fp32":
                figures[f"{label} min cosine"] = cos
            out(f"[int8] {label:22s} kernels after onnxruntime optimisation {kernel_counts(root / f'opt{i}.onnx')}, "
                f"min cosine vs fp32 on 12 images {cos:.4f}")
    for bs in (1, 8):
        x = person_like_images(bs, 256, 128, seed=11)
        best = {k: 0.0 for k in sessions}
        for _ in range(rounds):  # interleaved, so load changes hit every model alike
            for label, sess in sessions.items():
                best[label] = max(best[label], images_per_second(lambda b, s=sess: s.run(None, {"input": b}), x, seconds))
        for label in sessions:
            ratio = best[label] / best["fp32"]
            figures[f"{label} batch {bs}"] = ratio
            out(f"[int8] batch {bs}: {label:22s} {best[label]:6.1f} img/s  {ratio:.2f}x fp32 onnxruntime")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, help="fp32 ONNX (default: build the trained-like R50 of project.py)")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.onnx is None:
        sys.path.insert(0, str(HERE))
        from project import r50_onnx

        with tempfile.TemporaryDirectory() as td:
            data = r50_onnx(Path(td))
    else:
        data = args.onnx.read_bytes()
    int8_figures(data, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
