"""Throughput table for scripts/gpu_check.sh: TensorRT engines vs PyTorch CUDA, batch 1 and 8 (images/s).

End to end per call: host float32 batch in, host features out (the engine runner includes its H2D/D2H
copies; PyTorch includes .cuda() and .cpu()). Rows for engines appear only where TensorRT is installed.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def rate(fn, batch: np.ndarray, seconds: float = 2.0) -> float:
    for _ in range(10):
        fn(batch)
    n, t0 = 0, time.perf_counter()
    while True:
        fn(batch)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 20:
            return n * len(batch) / dt


def main() -> int:
    import torch

    from reidbuild.images import load_images
    from reidbuild.tensorrt.env import available
    from tests.gpu.common import cuda_reason
    from tests.precision.common import build_demo_model, demo_config, export_simplified, synth_images

    why_cuda = cuda_reason() if torch.cuda.is_available() else "torch sees no CUDA GPU"
    if why_cuda:
        print(f"throughput: skipped ({why_cuda})")
        return 0
    root = Path(tempfile.mkdtemp())
    model = build_demo_model(demo_config(root), load_images(synth_images(root / "n", 32, 3), 256, 128))
    x = np.random.default_rng(0).uniform(0, 255, (8, 3, 256, 128)).astype(np.float32)
    rows = []
    torch.backends.cudnn.benchmark = True
    cuda = model.cuda().eval()
    for label, dtype in (("PyTorch CUDA fp32 (TF32 off)", torch.float32), ("PyTorch CUDA fp16 autocast", torch.float16)):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        def run(b, dtype=dtype):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float16):
                return cuda(torch.from_numpy(b).cuda()).float().cpu().numpy()
        rows += [(label, b, rate(run, x[:b])) for b in (1, 8)]
    # how far GPU fp32 (TF32 off) lands from the CPU reference, judged with the fp32 parity profile
    from reidbuild.compare import compare
    from reidbuild.precision.profiles import default_tolerance
    from tests.precision.common import TEST_IMAGES, torch_features

    imgs = load_images(TEST_IMAGES, 256, 128)
    with torch.inference_mode():
        gpu = cuda(torch.from_numpy(imgs).cuda()).cpu().numpy()
    cpu_ref = torch_features(model.cpu(), imgs)
    c = compare(cpu_ref, gpu, default_tolerance("tensorrt"))
    print(f"PyTorch CUDA fp32 (TF32 off) vs CPU, fp32 profile rtol 1e-3/atol 1e-6: passed={c.passed} "
          f"max_abs={c.max_abs:.3g} max_rel={c.max_rel:.3g} min_cosine={c.min_cosine:.8f} {c.failures}")
    cuda = model.cuda().eval()
    why_trt = available()
    if why_trt is None:
        from reidbuild.backends.tensorrt import TensorRTRunner
        from reidbuild.precision import convert_fp16, quantize_int8
        from reidbuild.tensorrt.build import EngineSettings, build_engine

        fp32 = export_simplified(model.cpu())
        calib = load_images(synth_images(root / "c", 16, 4), 256, 128)
        graphs = {"fp32": fp32, "fp16": convert_fp16(fp32)[0],
                  "int8": quantize_int8(fp32, calib, method="percentile", workdir=root / "q")[0]}
        for mode, data in graphs.items():
            built = build_engine(data, EngineSettings(batch_size=8))
            with TensorRTRunner(built.engine) as runner:
                rows += [(f"TensorRT {mode} engine", b, rate(runner.infer, x[:b])) for b in (1, 8)]
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; R18 256x128, host in/out")
    print(f"{'backend':32s} {'batch':>5s} {'images/s':>10s}")
    for label, b, ips in rows:
        print(f"{label:32s} {b:5d} {ips:10.1f}")
    if why_trt:
        print(f"(no TensorRT rows: {why_trt})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
