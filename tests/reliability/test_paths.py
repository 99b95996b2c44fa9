"""Paths: the model name (from which every artifact file name is derived) must be a plain file name, and
nothing is ever written outside ``output_dir`` and the lock file, not even through symlinks planted in
``output_dir`` under the names of the artifacts, temp files or the lock."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import tiny_manifest
from tests.reliability._util import (ARTIFACTS, stable_lock, Child, assert_one_line_error, child_env, cli, count, sha,
                                     snapshot)

BAD_NAMES = ["a/b", "../escape", "..", "a\\b", ".hidden", "/etc/passwd", "x/../../y", "", "a..b", "..\\..\\x",
             ".", "a\x00b", "x" * 101, "tiny/../../../../tmp/evil"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_name_must_be_a_plain_file_name(tmp_path, name):
    root = tmp_path / "proj"
    m = tiny_manifest(root, name=json.dumps(name))  # a JSON string is a valid YAML double-quoted scalar
    before = snapshot(tmp_path)
    for command in ("validate", "apply"):
        code, out, err = cli(command, m)
        line = assert_one_line_error(code, err, 2, "name")
        assert "plain file name" in line or "at most 100 characters" in line, line
        assert f"{m}:2:" in line, line  # points at the manifest line
    assert snapshot(tmp_path) == before, "a refused manifest wrote something"
    count("paths: bad names refused")


def test_every_artifact_name_of_an_accepted_manifest_is_plain(tmp_path):
    from reidbuild.manifest import load_manifest
    from reidbuild.stages.assemble import assemble

    for name in ["tiny", "a.b", "x-y_z", "résumé", "a b", "n" * 100, "a.", "a.b.c"]:
        m = tiny_manifest(tmp_path, name=json.dumps(name))
        lm = load_manifest(m)
        built = assemble(lm)
        for stage in getattr(built, "stages", built):
            for f in stage.outputs:
                assert "/" not in f and "\\" not in f and not f.startswith(".") and f not in (".", ".."), f
                assert (lm.output_dir / f).resolve().parent == lm.output_dir


def _plant(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)


def test_symlinks_planted_in_output_dir_are_replaced_never_followed(project, tmp_path):
    root, out = project.root, project.out
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {}
    for n in ARTIFACTS + ("victim.lock", "tmpfile", "pid"):
        victims[n] = outside / n
        victims[n].write_text(f"precious {n}\n")
    (outside / "dir").mkdir()
    for n in ARTIFACTS:  # every artifact is a link to a file outside
        _plant(out / n, victims[n])
    # links named like temp files of a dead run (they must not be followed, and not be deleted through)
    for n in ARTIFACTS:
        _plant(out / f".{n}.tmp-999999-deadbeef", victims["tmpfile"])
    _plant(out / ".tmp-work-999999-abcdef", outside / "dir")
    _plant(root / ".m.lock.tmp-999999-deadbeef", victims["tmpfile"])
    # the lock itself is a link to an outside copy of the real lock (read through, never written through)
    shutil.copy(root / "m.lock", victims["victim.lock"])
    victims["victim.lock"].write_text(project.lock_text)
    _plant(root / "m.lock", victims["victim.lock"])
    # anything a child process writes to TMPDIR/HOME/caches lands inside the snapshot too
    sandbox = tmp_path / "sandbox"
    for d in ("tmp", "home", "cache"):
        (sandbox / d).mkdir(parents=True)
    env = child_env(TMPDIR=str(sandbox / "tmp"), HOME=str(sandbox / "home"), XDG_CACHE_HOME=str(sandbox / "cache"))

    def outside_of_output(p: Path) -> bool:
        return p == out or out in p.parents or p == root / "m.lock"

    before = snapshot(tmp_path, skip=outside_of_output)
    child = Child.apply(project.manifest, "--force", env=env)
    assert child.finish() == 0, child.err()
    after = snapshot(tmp_path, skip=outside_of_output)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
    for n, p in victims.items():
        assert p.read_text() == f"precious {n}\n" if n != "victim.lock" else p.read_text() == project.lock_text
    for n in ARTIFACTS:
        assert not (out / n).is_symlink() and sha(out / n) == project.artifacts[n]
    assert not (root / "m.lock").is_symlink()
    assert stable_lock((root / "m.lock").read_text()) == stable_lock(project.lock_text)
    assert not list((outside / "dir").iterdir())
    code, vout, _ = cli("verify", project.manifest)
    assert code == 0, vout
    count("paths: planted symlinks not followed", len(ARTIFACTS) * 2 + 3)


def test_symlinked_run_lock_is_refused_clearly(project, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pid = project.out / ".reidbuild.pid"
    pid.unlink()
    os.symlink(victim, pid)
    before = snapshot(tmp_path, skip=lambda p: p == pid)
    code, out, err = cli("apply", project.manifest)
    assert_one_line_error(code, err, 2, "link")
    assert victim.read_text() == "precious\n"
    assert snapshot(tmp_path, skip=lambda p: p == pid) == before
    count("paths: planted symlinks not followed")


def test_symlinked_lock_file_dangling_is_replaced_not_followed(project, tmp_path):
    target = tmp_path / "nowhere" / "stolen.lock"
    target.parent.mkdir()
    lock = project.root / "m.lock"
    lock.unlink()
    os.symlink(target, lock)
    code, out, err = cli("apply", project.manifest)
    assert code == 0, err
    assert not target.exists() and not list(target.parent.iterdir())
    assert not lock.is_symlink() and stable_lock(lock.read_text()) == stable_lock(project.lock_text)
    count("paths: planted symlinks not followed")
