"""onnxruntime CPU throughput: fp32 ONNX vs the int8 Q/DQ ONNX reidbuild writes for TensorRT.

Model: fast-reid R18 at 256x128 (seeded random weights, data-calibrated BN neck, as in tests/precision),
int8 by reidbuild.precision.quantize_int8 (percentile calibration on 16 synthetic images). Sessions use
``session.intra_op.allow_spinning=0`` like reidbuild's runners. Also timed: the same quantisation with int32
biases (onnxruntime's default), to show what the TensorRT-oriented float-bias choice costs on a CPU.

    .venv/bin/python benchmarks/bench_int8.py [--seconds 1.5] [--rounds 5] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def session(data: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def images_per_second(sess, batch: np.ndarray, seconds: float) -> float:
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: batch})
    n, t0 = 0, time.perf_counter()
    while True:
        sess.run(None, {name: batch})
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 5:
            return n * len(batch) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="timing per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best round is reported")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    args = ap.parse_args()

    import onnxruntime as ort

    import reidbuild.precision.int8 as int8
    from reidbuild.images import load_images
    from tests.precision.common import build_demo_model, demo_config, export_simplified, synth_images

    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        model = build_demo_model(demo_config(root), load_images(synth_images(root / "n", 32, 3), 256, 128))
        fp32 = export_simplified(model)
        calib = load_images(synth_images(root / "c", 16, 4), 256, 128)
        q8, _ = int8.quantize_int8(fp32, calib, method="percentile", workdir=root / "q")
        # comparison only: onnxruntime's int32 bias quantisation (TensorRT cannot build that graph)
        q8_bias, _ = int8.quantize_int8(fp32, calib, method="percentile", workdir=root / "qb", quantize_bias=True)
    x = np.random.default_rng(0).uniform(0, 255, (8, 3, 256, 128)).astype(np.float32)
    models = [("fp32", fp32), ("int8 QDQ (float bias, reidbuild)", q8), ("int8 QDQ (int32 bias, CPU-only)", q8_bias)]
    cpu = platform.processor() or platform.machine()
    print(f"onnxruntime {ort.__version__} CPU, {os.cpu_count()} logical cores ({cpu}), threads "
          f"{args.threads or 'default'}, allow_spinning=0, R18 256x128; best of {args.rounds} interleaved rounds "
          f"of {args.seconds:g} s per cell (load average at start {os.getloadavg()[0]:.2f})")
    sessions = [(label, session(data, args.threads)) for label, data in models]
    print(f"{'model':34s} {'batch':>5s} {'images/s':>10s} {'vs fp32':>8s}")
    for b in (1, 8):
        best = {label: 0.0 for label, _ in sessions}
        for _ in range(args.rounds):  # interleave so a burst of load elsewhere hits every model alike
            for label, sess in sessions:
                best[label] = max(best[label], images_per_second(sess, x[:b], args.seconds))
        base = best[sessions[0][0]]
        for label, _ in sessions:
            print(f"{label:34s} {b:5d} {best[label]:10.1f} {best[label] / base:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
