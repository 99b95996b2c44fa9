"""Many manifests in one apply: files, folders and globs; --jobs in local processes; one failure does not stop
the others; a summary line per manifest; the exit code is the worst one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from reidbuild.fleet import ManifestResult, expand_manifests, worst
from tests.helpers import tiny_manifest, write

REPO = Path(__file__).resolve().parents[2]


def apply(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reidbuild.cli", "apply", *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_jobs_build_each_manifest_and_report_the_worst_exit_code(tmp_path):
    good = [tiny_manifest(tmp_path / f"g{i}", weights=f"{{random: {{seed: {i + 1}}}}}") for i in range(2)]
    bad = tiny_manifest(tmp_path / "bad")
    bad.write_text(bad.read_text().replace("height: 64", "height: -3"))
    r = apply(str(good[0]), str(bad), str(good[1]), "--jobs", "2", "--json")
    assert r.returncode == 2, r.stderr[-2000:]
    res = {Path(m["manifest"]).parent.name: m for m in json.loads(r.stdout)["manifests"]}
    assert res["bad"]["exit_code"] == 2 and "height" in res["bad"]["message"]
    for name in ("g0", "g1"):
        assert res[name]["exit_code"] == 0 and len(res[name]["ran"]) == 5
        assert (tmp_path / name / "m.lock").is_file()
    assert "[g0/m.yml] load: done" in r.stderr and "[g1/m.yml] load: done" in r.stderr
    # text summary: one line per manifest, then the total
    r = apply(str(tmp_path / "g*" / "m.yml"), str(bad))
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 4 and "2 of 3 manifests ok" in lines[-1]
    assert lines[0].endswith("ran 0, restored 0, up to date 5, skipped 0") and "FAILED (exit 2)" in lines[2]


def test_expand_manifests(tmp_path):
    a = write(tmp_path / "fleet" / "a.yml", "x")
    b = write(tmp_path / "fleet" / "b.yaml", "x")
    write(tmp_path / "fleet" / "a.lock", "x")
    c = write(tmp_path / "c.yml", "x")
    assert expand_manifests([str(tmp_path / "fleet"), str(tmp_path / "*.yml"), str(a)]) == [a, b, c]
    assert worst([ManifestResult("a"), ManifestResult("b", exit_code=3), ManifestResult("c", exit_code=1)]) == 3
    assert worst([ManifestResult("a")]) == 0


def test_ray_needs_a_cache_and_takes_a_manifest_after_the_flag(tmp_path):
    from click.testing import CliRunner

    from reidbuild.cli import main

    m = tiny_manifest(tmp_path)
    r = CliRunner().invoke(main, ["apply", "--ray", str(m)], catch_exceptions=False)
    assert r.exit_code == 2 and "--ray needs --cache" in r.stderr and "Traceback" not in r.stderr
    r = CliRunner().invoke(main, ["apply"], catch_exceptions=False)
    assert r.exit_code == 2 and "at least one manifest" in r.stderr


def test_each_job_gets_its_share_of_the_cores(monkeypatch):
    """--jobs N: a worker's PyTorch and onnxruntime threads are cores / N (a value the user set stays)."""
    from reidbuild.backends.onnxruntime import session_options
    from reidbuild.fleet import share_cores, threads_per_job

    cores = len(os.sched_getaffinity(0))
    assert threads_per_job(1) == cores and threads_per_job(cores) == 1 and threads_per_job(4 * cores) == 1
    # setenv first, so that monkeypatch restores the variable's original state (absent, usually) afterwards:
    # share_cores sets it without monkeypatch, and a leaked OMP_NUM_THREADS=1 would give every later test's
    # child processes one PyTorch thread (float results one ulp off the in-process builds they are compared with)
    monkeypatch.setenv("OMP_NUM_THREADS", "unset-below")
    monkeypatch.delenv("OMP_NUM_THREADS")
    share_cores(cores)
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert session_options().intra_op_num_threads == 1  # onnxruntime ignores OMP_NUM_THREADS by itself
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    share_cores(cores)
    assert os.environ["OMP_NUM_THREADS"] == "3" and session_options().intra_op_num_threads == 3
