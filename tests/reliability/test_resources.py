"""Resource bounds: temp files and stage scratch folders never outlive a run - not on success, not on a parity
or export failure, not on a failing write, and a killed run's leftovers are removed by the next run."""
from __future__ import annotations

import errno
import os
import sys
import textwrap

import pytest

from reidbuild import fsutil
from reidbuild.errors import StageFailed
from reidbuild.pipeline import Stage, StageResult, run
from tests.reliability._util import VOLATILE, Child, TEMP_RE, child_env, cli, count, temp_files


def _no_temps(project) -> None:
    left = temp_files(project.out, project.root)
    assert not left, f"temp files left behind: {[p.name for p in left]}"
    count("resources: runs checked for leftover temp files")


def test_clean_build_leaves_no_temp_files(built):
    _no_temps(built)


def test_parity_failure_leaves_no_temp_files(project):
    m = project.manifest
    m.write_text(m.read_text().replace("  backends: [onnxruntime]\n", "  backends: [onnxruntime]\n  rtol: 0.0\n  atol: 0.0\n"))
    code, out, err = cli("apply", m)
    assert code == 1 and "parity onnxruntime" in err, err
    _no_temps(project)


def test_export_failure_leaves_no_temp_files(project, monkeypatch):
    import torch

    def broken_export(*a, **k):
        buf = a[2]
        buf.write(b"half an onnx file")  # it got somewhere before failing
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    m = project.manifest
    m.write_text(m.read_text() + "targets:\n  onnx:\n    opset: 16\n")
    code, out, err = cli("apply", m)
    assert code == 5 and "ONNX export failed" in err, err
    _no_temps(project)
    # the run lock, the stat cache (reidbuild.statcache) and the run record (where each artifact came from) are
    # the only files besides the artifacts
    assert {p.name for p in project.out.iterdir()} == set(project.artifacts) | set(VOLATILE) | {
        ".reidbuild.pid", ".reidbuild-hashes.json", ".reidbuild-run.json"}


@pytest.mark.parametrize("target", ["tiny.onnx", "m.lock"])
def test_failing_write_leaves_no_temp_file(project, monkeypatch, target):
    """The disk fills up while an artifact (or the lock) is being written: the temp file goes, the old file stays."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{target}.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    if target == "m.lock":  # an unchanged lock is not rewritten: change the manifest's text so this one must be
        project.manifest.write_text(project.manifest.read_text() + "# edited\n")
    before = (project.out / "tiny.onnx").read_bytes(), (project.root / "m.lock").read_bytes()
    code, out, err = cli("apply", "--force", project.manifest)
    assert code != 0 and "No space left on device" in err, err
    _no_temps(project)
    assert ((project.out / "tiny.onnx").read_bytes(), (project.root / "m.lock").read_bytes())[
        ["tiny.onnx", "m.lock"].index(target)] == before[["tiny.onnx", "m.lock"].index(target)]


# ------------------------------------------------------------------------------- stage scratch folders

def _scratch_stage(fail: bool, seen: list) -> Stage:
    def body(ctx):
        d = ctx.tempdir()
        (d / "big.bin").write_bytes(b"x" * 1000)
        seen.append(d)
        if fail:
            raise StageFailed("the tool failed")
        return StageResult({"a.txt": b"a"})
    return Stage("scratch", body, outputs=("a.txt",))


@pytest.mark.parametrize("fail", [False, True])
def test_stage_scratch_folder_is_removed_on_success_and_failure(tmp_path, fail):
    seen: list = []
    kwargs = dict(lock_path=tmp_path / "m.lock", manifest_entry={}, output_dir=tmp_path / "out", base=tmp_path,
                  emit=lambda e: None)
    if fail:
        with pytest.raises(StageFailed):
            run([_scratch_stage(True, seen)], **kwargs)
    else:
        run([_scratch_stage(False, seen)], **kwargs)
    assert seen and not seen[0].exists()
    assert not [p for p in (tmp_path / "out").iterdir() if TEMP_RE.match(p.name)]
    count("resources: runs checked for leftover temp files")


_KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from reidbuild.pipeline import Stage, StageResult, run
    root = Path(sys.argv[1])
    def body(ctx):
        d = ctx.tempdir()
        (d / "partial.bin").write_bytes(b"x" * 1000)
        print("ready", d, flush=True)
        time.sleep(60)
        return StageResult({"a.txt": b"a"})
    run([Stage("scratch", body, outputs=("a.txt",))], lock_path=root / "m.lock", manifest_entry={},
        output_dir=root / "out", base=root, emit=lambda e: None)
""")


def test_scratch_folder_and_temp_files_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    child = Child([sys.executable, "-c", _KILLED, str(tmp_path)], child_env())
    deadline = 60
    import time

    t0 = time.monotonic()
    while not child.stdout and time.monotonic() - t0 < deadline:
        time.sleep(0.05)
    assert child.stdout and child.stdout[0].startswith("ready"), child.err()
    scratch = tmp_path / "out" / child.stdout[0].split()[1].rsplit("/", 1)[1]
    assert scratch.is_dir()
    assert child.kill9()
    # and an interrupted atomic write of the same dead run, next to the artifacts and next to the lock
    (tmp_path / "out" / f".a.txt.tmp-{child.proc.pid}-0123abcd").write_bytes(b"half")
    (tmp_path / f".m.lock.tmp-{child.proc.pid}-0123abcd").write_bytes(b"half")
    out = run([Stage("other", lambda ctx: StageResult({"b.txt": b"b"}), outputs=("b.txt",))],
              lock_path=tmp_path / "m.lock", manifest_entry={}, output_dir=tmp_path / "out", base=tmp_path,
              emit=lambda e: None)
    assert out.ran == ["other"]
    assert not scratch.exists(), "the killed run's scratch folder survived the next run"
    assert not temp_files(tmp_path / "out", tmp_path)
    count("resources: runs checked for leftover temp files")


def test_temp_files_of_a_live_run_are_left_alone(tmp_path):
    """Cleaning never deletes what another live process (this one's parent, say) is writing."""
    live = os.getppid()
    out = tmp_path / "out"
    out.mkdir()
    keep = [out / f".x.onnx.tmp-{live}-00ff00ff", out / f".tmp-work-{live}-abc"]
    keep[0].write_bytes(b"busy")
    keep[1].mkdir()
    fsutil.clean_temp_files(out)
    assert all(p.exists() for p in keep)
