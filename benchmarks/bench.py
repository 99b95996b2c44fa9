"""Print every figure the README's benchmark section quotes, each ratio measured within this one run.

The model is a fast-reid bag-of-tricks R50 at 256x128 with trained-like weights (benchmarks/project.py:
BatchNorm statistics measured on person-like images, features that differ between images), 12 parity
images, targets onnx + caffe. Printed: the CPU, full (median of 3) and no-op `reidbuild apply` (fresh processes: wall, CPU,
peak RSS, stage times; the first no-op plans and records, the next ones take reidbuild/noopcache.py's fast
path), onnxruntime fp32 vs PyTorch eager, and int8 vs fp32 on onnxruntime with int8 fidelity
(benchmarks/bench_int8.py).

Run: .venv/bin/python benchmarks/bench.py [--full-runs 3] [--noop-runs 3] [--seconds 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as reidbuild's CLI runs PyTorch: no spinning threads
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parent


def cpu_facts() -> str:
    """Model name, usable cores and the SIMD flags that decide int8 speed, from /proc/cpuinfo."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model}, {cores} usable cores, flags: {', '.join(simd) or 'none of avx2/avx512f/vnni'}"


def apply_proc(manifest: Path, *extra: str, env_extra: dict[str, str] | None = None) -> tuple[float, dict]:
    """(wall s, --json output) of one `reidbuild apply` in a fresh process (CPU and RSS: RUSAGE_CHILDREN)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's install has .pyc files
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "reidbuild.cli", "apply", "--json", str(manifest), *extra],
                       capture_output=True, text=True, env=env, cwd=manifest.parent)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"apply {manifest} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1]}")
    return wall, json.loads(r.stdout)


def throughput(run, batch: np.ndarray, seconds: float) -> float:
    run(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


def clean_build(manifest: Path) -> None:
    """Remove everything a build of ``manifest`` wrote (outputs, lock, no-op record), so the next apply is full."""
    import shutil

    shutil.rmtree(manifest.parent / "outputs", ignore_errors=True)
    for leftover in manifest.parent.glob(f"*{manifest.stem}.lock*"):
        leftover.unlink()
    for leftover in manifest.parent.glob(f".{manifest.name}*"):
        leftover.unlink()


def full_apply(manifest: Path, env_extra: dict[str, str] | None = None) -> tuple[float, float, float, int, dict]:
    """(wall s, CPU s, peak RSS MiB, minor page faults, --json output) of one full apply from nothing, in a fresh
    process."""
    import resource

    clean_build(manifest)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, info = apply_proc(manifest, env_extra=env_extra)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    faults = after.ru_minflt - before.ru_minflt
    return wall, cpu, after.ru_maxrss / 1024.0, faults, info  # ru_maxrss: the largest child so far


def bench_apply(manifest: Path, noop_runs: int, full_runs: int) -> None:
    runs = [full_apply(manifest) for _ in range(full_runs)]
    for i, (w, c, _, f, _) in enumerate(runs, 1):
        print(f"[r50] full apply run {i}: {w:.2f} s wall, {c:.2f} s CPU, {f:,d} page faults")
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    rss = max(r[2] for r in runs)
    info = min(runs, key=lambda r: abs(r[0] - wall))[4]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in info["timings"].items())
    print(f"[r50] full apply (median of {full_runs}) {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss:.0f} MiB")
    print(f"[r50] stage times of the median run (s): {stages}")
    w4, c4, _, f4, _ = full_apply(manifest, {"REIDBUILD_HUGEPAGES": "0"})
    print(f"[r50] full apply without huge pages (REIDBUILD_HUGEPAGES=0): {w4:.2f} s wall, {c4:.2f} s CPU, "
          f"{f4:,d} page faults: the median build above takes {wall / w4:.2f}x its wall time, "
          f"{statistics.median(r[3] for r in runs) / max(f4, 1):.2f}x its page faults")
    first, *fast = [noop_proc(manifest) for _ in range(noop_runs + 1)]
    assert not first[2] and all(f[2] for f in fast), "the no-op fast path was not taken where expected"
    print(f"[r50] first no-op apply (normal path: plans, then records the no-op) {first[0]:.3f} s wall, "
          f"{first[1]:.3f} s CPU")
    w = statistics.median(x[0] for x in fast)
    c = statistics.median(x[1] for x in fast)
    print(f"[r50] no-op apply (fast path, median of {noop_runs}) {w:.3f} s wall, {c:.3f} s CPU: {100 * w / wall:.1f}% "
          f"of the full apply's wall time, {100 * c / cpu:.1f}% of its CPU time")


def noop_proc(manifest: Path) -> tuple[float, float, bool]:
    """(wall s, CPU s, fast path taken) of a plain `reidbuild apply manifest` that must find nothing to do, in a
    fresh process as a user runs it (the fast path replays only plain applies, not --json)."""
    import resource

    env = dict(os.environ, PYTHONPATH=str(REPO), REIDBUILD_NOOP_DEBUG="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "reidbuild.cli", "apply", manifest.name], capture_output=True, text=True,
                       env=env, cwd=manifest.parent)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0 or "nothing to do" not in r.stdout:
        sys.exit(f"no-op apply {manifest} did something ({r.returncode}): {r.stdout}{r.stderr}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, "[noop] fast path" in r.stderr


def bench_ort_vs_torch(manifest: Path, seconds: float, rounds: int) -> None:
    import torch

    from reidbuild.backends.onnxruntime import OnnxRuntimeRunner
    from reidbuild.manifest import load_manifest
    from reidbuild.sources import open_source
    from reidbuild.testing import person_like_images

    lm = load_manifest(manifest)
    model = open_source(lm).build_model()
    runner = OnnxRuntimeRunner(lm.output_dir / f"{lm.model.name}.onnx")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    for bs in (1, 8):
        x = person_like_images(bs, 256, 128, seed=11)

        def torch_run(b):
            with torch.inference_mode():
                model(torch.from_numpy(b))
        t_ips = o_ips = 0.0
        for _ in range(rounds):  # interleaved, best kept: load changes hit both alike
            t_ips = max(t_ips, throughput(torch_run, x, seconds))
            o_ips = max(o_ips, throughput(runner.infer, x, seconds))
        print(f"[r50] batch {bs}: PyTorch eager {t_ips:.1f} img/s, onnxruntime fp32 {o_ips:.1f} img/s, "
              f"ratio {o_ips / t_ips:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noop-runs", type=int, default=3)
    ap.add_argument("--full-runs", type=int, default=3, help="full applies from nothing (the median is quoted)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per throughput measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved int8 rounds (best kept)")
    args = ap.parse_args()
    from bench_int8 import int8_figures
    from project import make_r50_project

    load = os.getloadavg()[0]
    print(f"machine: {cpu_facts()}; python {sys.version.split()[0]}; load average at start {load:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_r50_project(Path(tmp))
        bench_apply(manifest, args.noop_runs, args.full_runs)
        bench_ort_vs_torch(manifest, args.seconds, args.rounds)
        fp32 = (manifest.parent / "outputs" / "bench_r50.onnx").read_bytes()
        int8_figures(fp32, args.seconds, args.rounds, out=lambda s: print(s.replace("[int8]", "[r50 int8]")))


if __name__ == "__main__":
    main()
