"""Print sha256 of the fp16/int8 ONNX made from one fp32 ONNX and one calibration tensor: run it on two
machines with the same onnxruntime and compare (are the locked precision artifacts reproducible across
CPUs and thread counts?). Not a test; CPU only.

    python tests/gpu/repro_hashes.py                      # the demo model, made here with torch
    python tests/gpu/repro_hashes.py --onnx m.onnx --calib calib.npy [--save-inputs DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", type=Path)
    ap.add_argument("--calib", type=Path)
    ap.add_argument("--save-inputs", type=Path, help="write the demo's m.onnx and calib.npy here")
    args = ap.parse_args()
    import onnxruntime

    from reidbuild.precision import convert_fp16, quantize_int8

    root = Path(tempfile.mkdtemp())
    if args.onnx:
        fp32, calib = args.onnx.read_bytes(), np.load(args.calib)
    else:
        from reidbuild.images import load_images
        from tests.precision.common import build_demo_model, demo_config, export_simplified, synth_images

        model = build_demo_model(demo_config(root), load_images(synth_images(root / "n", 32, 3), 256, 128))
        fp32 = export_simplified(model)
        calib = load_images(synth_images(root / "c", 16, 4), 256, 128)
        if args.save_inputs:
            args.save_inputs.mkdir(parents=True, exist_ok=True)
            (args.save_inputs / "m.onnx").write_bytes(fp32)
            np.save(args.save_inputs / "calib.npy", calib)
    h = lambda b: hashlib.sha256(b).hexdigest()[:16]
    print(f"onnxruntime {onnxruntime.__version__}; calib {h(calib.tobytes())} fp32 {h(fp32)} fp16 {h(convert_fp16(fp32)[0])}")
    for method in ("percentile", "minmax", "entropy"):
        data, rec = quantize_int8(fp32, calib, method=method, workdir=root / method)
        print(f"int8 {method:10s} {h(data)} scales {rec['scales_sha256'][:16]}")


if __name__ == "__main__":
    main()
