"""Print the fleet and shared-cache figures the README quotes, each ratio measured within this one run.

1. Eight small manifests (fast-reid R18 at 128x64, seeds 1..8, ONNX + onnxruntime parity), each set in fresh
   folders: serial apply, `apply --jobs 2`, and apply with every stage restored from a warm `file://` cache.
2. The R50 manifest (`benchmarks/r50.yml`: ONNX + Caffe + parity): a cold build that fills an empty cache,
   then a fresh clone whose apply restores everything from it; the warm/cold ratio (target: under 10%).

Run: .venv/bin/python benchmarks/bench_cache.py [--only fleet|r50]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SMALL = """\
version: 1
name: small{seed}
source:
  format: fastreid
  config: {repo}/configs/demo_R18.yml
  weights: {{random: {{seed: {seed}}}}}
input: {{height: 128, width: 64}}
output_dir: out
targets:
  onnx: {{opset: 17, simplify: true, dynamic_batch: true}}
parity:
  images: {repo}/test_data/*
  backends: [onnxruntime]
"""


def apply(*args: str) -> tuple[float, dict]:
    """Wall seconds and the --json report of one `reidbuild apply` in a fresh process."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "reidbuild.cli", "apply", *args, "--json"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"apply {' '.join(args)} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return secs, json.loads(r.stdout)


def small_set(root: Path) -> list[str]:
    paths = []
    for seed in range(1, 9):
        folder = root / f"m{seed}"
        folder.mkdir(parents=True)
        (folder / "m.yml").write_text(SMALL.format(seed=seed, repo=REPO))
        paths.append(str(folder / "m.yml"))
    return paths


def restored_everything(report: dict) -> bool:
    runs = report.get("manifests", [report])
    return all(not m["ran"] and m["restored"] for m in runs)


def bench_fleet(tmp: Path) -> None:
    cache = f"file://{tmp / 'fleet-cache'}"
    serial, _ = apply(*small_set(tmp / "serial"), "--cache", cache)  # fills the cache while building serially
    jobs, _ = apply(*small_set(tmp / "jobs"), "--jobs", "2")
    warm, report = apply(*small_set(tmp / "warm"), "--cache", cache)
    assert restored_everything(report), "the warm-cache apply ran a stage"
    print(f"[fleet] 8 manifests: serial {serial:.1f} s, --jobs 2 {jobs:.1f} s ({serial / jobs:.2f}x faster), "
          f"warm cache {warm:.1f} s ({serial / warm:.1f}x faster; {100 * warm / serial:.0f}% of serial)")


def bench_r50(tmp: Path) -> None:
    src = REPO / "benchmarks" / "r50.yml"
    cache = f"file://{tmp / 'r50-cache'}"
    times = {}
    for clone in ("cold", "warm"):
        folder = tmp / f"r50-{clone}"
        folder.mkdir()
        manifest = folder / "r50.yml"
        manifest.write_text(src.read_text().replace("../outputs/bench_r50", "out")
                            .replace("../configs/", f"{REPO}/configs/").replace("../test_data/", f"{REPO}/test_data/"))
        times[clone], report = apply(str(manifest), "--cache", cache)
    assert restored_everything(report), "the warm-cache apply ran a stage"
    share = times["warm"] / times["cold"]
    print(f"[r50] cold build {times['cold']:.1f} s, warm-cache apply (every stage restored) {times['warm']:.2f} s: "
          f"{100 * share:.1f}% of the cold build ({'under' if share < 0.10 else 'NOT under'} the 10% target)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["fleet", "r50"])
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "fleet"):
            bench_fleet(Path(tmp))
        if args.only in (None, "r50"):
            bench_r50(Path(tmp))


if __name__ == "__main__":
    main()
