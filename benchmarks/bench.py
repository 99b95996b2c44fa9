"""Print the figures the README quotes: apply times, no-op ratio, images/s per backend, peak RSS.

Run: .venv/bin/python benchmarks/bench.py [--only demo|r50]
Each ratio is measured within one run of this script, on the same machine, back to back.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = {"demo": REPO / "manifests" / "demo.yml", "r50": REPO / "benchmarks" / "r50.yml"}


def apply_once(manifest: Path, *extra: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `reidbuild apply` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "reidbuild.cli", "apply", str(manifest), *extra],
                       capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"apply {manifest} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return secs, max(peak, before) / 1024.0


def throughput(run, batch: np.ndarray, seconds: float = 3.0) -> float:
    run(batch)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


def bench(key: str) -> None:
    src = MANIFESTS[key]
    with tempfile.TemporaryDirectory() as tmp:
        # a private copy of the manifest so the committed lock and outputs are not touched
        work = Path(tmp) / src.parent.name
        work.mkdir()
        manifest = work / src.name
        manifest.write_text(src.read_text().replace("../outputs/", f"{tmp}/outputs/")
                            .replace("../configs/", f"{REPO}/configs/").replace("../test_data/", f"{REPO}/test_data/"))
        full, rss = apply_once(manifest)
        noop, _ = apply_once(manifest)
        print(f"[{key}] full apply {full:.1f} s, no-op apply {noop:.2f} s, ratio {full / noop:.1f}x, "
              f"peak RSS of a full apply {rss:.0f} MiB")

        import torch

        from reidbuild.backends.onnxruntime import OnnxRuntimeRunner
        from reidbuild.manifest import load_manifest
        from reidbuild.stages.load import model_config, build_torch_model

        lm = load_manifest(manifest)
        model = build_torch_model(lm, model_config(lm))
        ort_runner = OnnxRuntimeRunner(lm.output_dir / f"{lm.model.name}.onnx")
        h, w = lm.model.input.height, lm.model.input.width
        torch.set_num_threads(os.cpu_count() or 1)
        for bs in (1, 8):
            x = np.random.default_rng(0).uniform(0, 255, (bs, 3, h, w)).astype(np.float32)

            def torch_run(b):
                with torch.inference_mode():
                    model(torch.from_numpy(b))
            t_ips = throughput(torch_run, x)
            o_ips = throughput(ort_runner.infer, x)
            print(f"[{key}] batch {bs}: PyTorch {t_ips:.1f} img/s, onnxruntime {o_ips:.1f} img/s, "
                  f"ratio {o_ips / t_ips:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(MANIFESTS))
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores; python {sys.version.split()[0]}")
    for key in [args.only] if args.only else list(MANIFESTS):
        bench(key)


if __name__ == "__main__":
    main()
