"""The no-op fast path (reidbuild.noopcache), through the real command in fresh processes.

A recorded no-op is replayed without importing click, pydantic or PyYAML; anything the normal path read that
changes - the manifest, an image, a patch, an artifact, the lock, an environment variable, reidbuild's own
code, the arguments - sends the next `apply` down the normal path, which sees the change.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reidbuild import fsutil, noopcache
from tests.helpers import REPO, tiny_manifest

FAST = "[noop] fast path"
NORMAL = "[noop] normal path"


def run(m: Path, *flags: str, env: dict[str, str] | None = None, pythonpath: Path = REPO,
        python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``python -m reidbuild.cli apply <flags> m.yml`` in m's folder, with the fast path's debug lines on."""
    full = dict(os.environ, PYTHONPATH=str(pythonpath), REIDBUILD_NOOP_DEBUG="1", **(env or {}))
    full.pop("REIDBUILD_CACHE", None)
    return subprocess.run([sys.executable, *python_flags, "-m", "reidbuild.cli", "apply", *flags, m.name],
                          capture_output=True, text=True, cwd=m.parent, env=full, timeout=600)


def settle(m: Path, *flags: str, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run until an apply takes the fast path (the first no-op records; a racy file can take one more)."""
    for _ in range(4):
        r = run(m, *flags, **kw)  # type: ignore[arg-type]
        assert r.returncode == 0, r.stderr
        if FAST in r.stderr:
            return r
    raise AssertionError(f"no fast path after 4 runs: {r.stderr}")


def normal(r: subprocess.CompletedProcess[str]) -> bool:
    return NORMAL in r.stderr and FAST not in r.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("noopfast")
    (root / "patches").mkdir()
    shutil.copy(REPO / "graph_patches" / "onnx" / "l2_normalize.yml", root / "patches" / "l2.yml")
    m = tiny_manifest(root, extra="targets:\n  onnx:\n    patches: [patches/l2.yml]\n")
    r = run(m)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ran ")
    return m


def test_second_noop_replays_without_click_or_pydantic(project: Path) -> None:
    first = run(project)
    assert first.returncode == 0 and "nothing to do" in first.stdout, first.stderr
    fast = settle(project, python_flags=("-X", "importtime"))
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in fast.stderr.splitlines()
                if line.startswith("import time:")}
    assert "reidbuild" in imported  # the probe reads import lines at all
    assert not imported & {"click", "pydantic", "yaml", "torch", "onnx", "numpy"}, imported
    # the same words as the normal no-op (its time aside), the stage lines on stderr too
    assert fast.stdout.splitlines()[1:] == first.stdout.splitlines()[1:]
    assert fast.stdout.split("(")[0] == first.stdout.split("(")[0]  # "nothing to do: all N stages up to date"
    stage_lines = [ln for ln in first.stderr.splitlines() if "up to date" in ln]
    assert stage_lines and all(ln in fast.stderr for ln in stage_lines)
    assert (project.parent / f".{project.name}{noopcache.RECORD_SUFFIX}").is_file()


def _touch(p: Path) -> None:
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("what", ["manifest", "config", "patch", "lock", "image", "statcache"])
def test_a_touched_input_takes_the_normal_path(project: Path, what: str) -> None:
    settle(project)
    target = {"manifest": project, "config": project.parent / "cfg" / "config.yml",
              "patch": project.parent / "patches" / "l2.yml", "lock": project.with_suffix(".lock"),
              "image": project.parent / "imgs" / "im0.png",
              "statcache": project.parent / "out" / ".reidbuild-hashes.json"}[what]
    _touch(target)
    r = run(project)
    assert r.returncode == 0 and normal(r), r.stderr
    assert "nothing to do" in r.stdout  # same bytes: the normal path re-hashes and finds nothing to do


def test_an_edited_manifest_and_lock_take_the_normal_path(project: Path) -> None:
    settle(project)
    project.write_text(project.read_text() + "# a comment\n")
    r = run(project)
    assert r.returncode == 0 and normal(r), r.stderr
    settle(project)
    lock = project.with_suffix(".lock")
    lock.write_text(lock.read_text() + "\n")
    r = run(project)
    assert normal(r), r.stderr


def test_an_image_added_to_the_glob_reruns_parity(project: Path) -> None:
    settle(project)
    imgs = project.parent / "imgs"
    shutil.copy(imgs / "im0.png", imgs / "im9.png")
    try:
        r = run(project)
        assert r.returncode == 0 and normal(r), r.stderr
        assert "parity.onnxruntime: running" in r.stderr
    finally:
        (imgs / "im9.png").unlink()
    r = run(project)
    assert normal(r) and "parity.onnxruntime: running" in r.stderr, r.stderr


def test_an_image_rewritten_with_its_size_and_mtime_reruns_parity(project: Path) -> None:
    """Same size and a restored mtime: the ctime still moves, so stat sees it (only a rewrite that also kept the
    ctime - a clock set back - fools a stat record; `verify` and `apply --locked` re-hash)."""
    settle(project)
    img = project.parent / "imgs" / "im1.png"
    before, st = img.read_bytes(), img.stat()
    changed = bytearray(before)
    changed[-20] ^= 0xFF  # inside the last IDAT/IEND bytes: same size
    with open(img, "r+b") as f:
        f.write(bytes(changed))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        r = run(project)
        assert normal(r), r.stderr
    finally:
        with open(img, "r+b") as f:
            f.write(before)
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("how", ["deleted", "modified"])
def test_a_damaged_artifact_takes_the_normal_path(project: Path, how: str) -> None:
    settle(project)
    artifact = project.parent / "out" / "tiny.fastreid.json"
    if how == "deleted":
        artifact.unlink()
    else:
        artifact.write_text(artifact.read_text() + " ")
    r = run(project)
    assert normal(r), r.stderr
    assert "nothing to do" not in r.stdout  # the normal path rebuilds what is missing or changed
    assert r.returncode == 0 and artifact.is_file()


def test_a_changed_environment_variable_takes_the_normal_path(project: Path) -> None:
    settle(project)
    r = run(project, env={"REIDBUILD_SOMETHING": "1"})
    assert r.returncode == 0 and normal(r), r.stderr


@pytest.mark.parametrize("flags", [("--quiet",), ("--locked",), ("--force",), ("--json",),
                                   ("--cache", "file:///nonexistent-reidbuild-cache")])
def test_other_flags_take_the_normal_path(project: Path, flags: tuple[str, ...]) -> None:
    settle(project)
    r = run(project, *flags)
    assert FAST not in r.stderr, r.stderr
    if flags == ("--quiet",):  # replayable, but recorded for its own arguments
        assert normal(r) and r.stderr.count("up to date") == 0
        assert FAST in settle(project, "--quiet").stderr
    if flags == ("--locked",):
        assert r.returncode == 0 and "nothing to do" in r.stdout


def test_a_held_run_lock_takes_the_normal_path(project: Path) -> None:
    settle(project, "--no-wait")
    with open(project.parent / "out" / ".reidbuild.pid", "r+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run(project, "--no-wait")
    assert r.returncode == 4, r.stderr  # the normal path's answer: another run holds the folder
    assert "run lock is held" in r.stderr


def test_a_damaged_record_takes_the_normal_path(project: Path) -> None:
    settle(project)
    record = Path(noopcache.record_path(str(project)))
    doc = json.loads(record.read_text())
    doc["files"] = "not a mapping"
    record.write_text(json.dumps(doc))
    r = run(project)
    assert r.returncode == 0 and normal(r) and "nothing to do" in r.stdout, r.stderr


def test_changed_reidbuild_code_takes_the_normal_path(project: Path, tmp_path: Path) -> None:
    """A copy of the package on PYTHONPATH: editing one of its modules (one the record names because the normal
    path imported it) invalidates the record."""
    shutil.copytree(REPO / "reidbuild", tmp_path / "reidbuild", ignore=shutil.ignore_patterns("__pycache__"))
    settle(project, pythonpath=tmp_path)
    lockfile = tmp_path / "reidbuild" / "lockfile.py"
    lockfile.write_text(lockfile.read_text() + "\n# edited\n")
    r = run(project, pythonpath=tmp_path)
    assert r.returncode == 0 and normal(r), r.stderr


def test_the_run_lock_name_is_fsutils() -> None:
    import inspect

    assert f'"{noopcache.RUN_LOCK_NAME}"' in inspect.getsource(fsutil.run_lock)


def test_only_a_plain_apply_of_one_manifest_file_is_replayable(tmp_path: Path) -> None:
    m = tmp_path / "m.yml"
    m.write_text("version: 1\n")
    assert noopcache.fast_manifest(["apply", str(m)]) == str(m)
    assert noopcache.fast_manifest(["apply", "-q", "--no-wait", str(m)]) == str(m)
    for argv in (["plan", str(m)], ["verify", str(m)], ["apply", "--locked", str(m)], ["apply", "--json", str(m)],
                 ["apply", "--force", str(m)], ["apply", "-j", "2", str(m)], ["apply", str(m), str(m)],
                 ["apply", str(tmp_path)], ["apply", str(tmp_path / "*.yml")], ["apply", "--ray", str(m)],
                 ["apply", str(tmp_path / "missing.yml")], ["apply"]):
        assert noopcache.fast_manifest(argv) is None, argv


def test_the_fast_path_costs_well_under_the_issue_target(project: Path) -> None:
    """Issue 11: a no-op must cost at most 0.15 s; measured as the whole process's CPU time (the machine is
    shared, wall time is not), median of three."""
    import resource
    import statistics

    settle(project)
    costs = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = run(project)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert FAST in r.stderr, r.stderr
        costs.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    assert statistics.median(costs) <= 0.15, costs
