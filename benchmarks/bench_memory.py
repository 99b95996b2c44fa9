"""Peak memory of a full `reidbuild apply`: the trained-like bag-of-tricks R50 and R101 at 256x128.

Each model is built by benchmarks/project.py (trained-like weights, 12 person-like parity images, targets onnx
+ caffe with parity on onnxruntime and pycaffe) and applied from scratch in a fresh process, ``--runs`` times;
printed per model: the peak RSS of each run (the apply process's own maximum resident set size, from
wait4), its wall and CPU time, and the stage times of the last run, against the targets of issue 11 (R50 <=
800 MiB, R101 <= 1,000 MiB). The CPU is stated as bench.py states it.

Run: .venv/bin/python benchmarks/bench_memory.py [--runs 1] [--only r50|r101]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as reidbuild's CLI runs PyTorch: no spinning threads
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parent
TARGET_MIB = {50: 800, 101: 1000}


def apply_once(manifest: Path) -> tuple[float, float, float, dict]:
    """(peak RSS MiB, wall s, CPU s, --json output) of one full apply in a fresh process, outputs removed
    first."""
    shutil.rmtree(manifest.parent / "outputs", ignore_errors=True)
    manifest.with_suffix(".lock").unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's install has .pyc files
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "reidbuild.cli", "apply", "--json", manifest.name],
                                stdout=out, stderr=err, env=env, cwd=manifest.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            last = err.read().decode(errors="replace").strip().splitlines()[-1:]
            sys.exit(f"apply {manifest} failed ({proc.returncode}): {last}")
        info = json.loads(out.read())
    return usage.ru_maxrss / 1024.0, wall, usage.ru_utime + usage.ru_stime, info


def bench_model(depth: int, root: Path, runs: int) -> None:
    from project import make_r50_project

    manifest = make_r50_project(root, depth=depth)
    results = [apply_once(manifest) for _ in range(runs)]
    peaks = ", ".join(f"{r[0]:.0f}" for r in results)
    worst = max(r[0] for r in results)
    verdict = "met" if worst <= TARGET_MIB[depth] else "NOT met"
    print(f"[r{depth}] full apply peak RSS {peaks} MiB ({runs} run{'s' * (runs > 1)}; target <= "
          f"{TARGET_MIB[depth]:,} MiB: {verdict}); wall {', '.join(f'{r[1]:.1f}' for r in results)} s, "
          f"CPU {', '.join(f'{r[2]:.1f}' for r in results)} s")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in results[-1][3]["timings"].items())
    print(f"[r{depth}] stage times (s): {stages}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="full applies per model (each from scratch)")
    ap.add_argument("--only", choices=["r50", "r101"], help="one model only")
    args = ap.parse_args()
    from bench import cpu_facts

    print(f"machine: {cpu_facts()}; python {sys.version.split()[0]}; load average at start "
          f"{os.getloadavg()[0]:.2f}")
    for depth in (50, 101):
        if args.only in (None, f"r{depth}"):
            with tempfile.TemporaryDirectory() as tmp:
                bench_model(depth, Path(tmp), args.runs)


if __name__ == "__main__":
    main()
