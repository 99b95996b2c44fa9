"""A no-op apply costs almost nothing: a stat cache instead of re-hashing, and no heavy imports.

``reidbuild.statcache`` remembers (path, device, inode, size, mtime_ns, ctime_ns) -> sha256 in the output
folder; apply trusts it for unchanged files. verify and apply --locked never read it (tests/reliability/
test_tamper.py proves they still catch same-size, restored-mtime rewrites and a forged cache).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from reidbuild import statcache
from reidbuild.cli import main
from reidbuild.fsutil import sha256_file
from tests.helpers import REPO, tiny_manifest

HEAVY = ("torch", "onnx", "onnxruntime", "onnxsim", "matplotlib", "numpy", "caffe", "cv2", "PIL")


def cli(*args: str):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    m = tiny_manifest(tmp_path_factory.mktemp("noop"))
    code, _, err = cli("apply", m)
    assert code == 0, err
    return m


def test_noop_apply_hashes_nothing(built, monkeypatch):
    def refuse(path):
        raise AssertionError(f"a no-op apply re-hashed {path}")

    cli("apply", built)  # entries written at the end of the build are trusted once outside the racy window
    monkeypatch.setattr(statcache, "sha256_file", refuse)
    code, out, err = cli("apply", built)
    assert code == 0, err
    assert "nothing to do" in out


def test_noop_apply_imports_nothing_heavy(built):
    """In a fresh interpreter (as a user runs it), a no-op apply loads none of the ML stacks."""
    probe = ("import sys, json\nsys.argv = ['reidbuild', 'apply', sys.argv[1]]\nfrom reidbuild.cli import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             f"print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})]))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", probe, str(built)], capture_output=True, text=True, env=env,
                       cwd=built.parent)
    code, heavy = json.loads(r.stdout.strip().splitlines()[-1])
    assert code == 0, r.stderr
    assert "nothing to do" in r.stdout
    assert heavy == [], f"a no-op apply imported {heavy}"


def test_stat_cache_trusts_only_unchanged_settled_files(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    old = time.time_ns() - 5 * 10**9
    os.utime(f, ns=(old, old))
    c = statcache.StatCache(tmp_path)
    assert c.file(f) == sha256_file(f)
    c.save()
    # a remembered hash is used while the stat fields match (here: a deliberately wrong one, to prove it)
    doc = json.loads((tmp_path / statcache.STATE_NAME).read_text())
    doc["entries"][str(f)][7] = "0" * 64
    (tmp_path / statcache.STATE_NAME).write_text(json.dumps(doc))
    assert statcache.StatCache(tmp_path).file(f) == "0" * 64
    # any change of size, mtime or ctime drops it
    f.write_bytes(b"y" * 1000)
    os.utime(f, ns=(old, old))
    assert statcache.StatCache(tmp_path).file(f) == sha256_file(f)


def test_racy_entries_are_rehashed(tmp_path):
    """An entry hashed within the timestamp granularity of the file's mtime is not trusted (git's racy rule)."""
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 10)
    c = statcache.StatCache(tmp_path)
    c.file(f)
    c.save()
    doc = json.loads((tmp_path / statcache.STATE_NAME).read_text())
    entry = doc["entries"][str(f)]
    entry[5], entry[7] = entry[3], "0" * 64  # hashed at the very moment of the last write, with a wrong hash
    (tmp_path / statcache.STATE_NAME).write_text(json.dumps(doc))
    assert statcache.StatCache(tmp_path).file(f) == sha256_file(f)


@pytest.mark.parametrize("content", [b"not json", b'{"version": 99, "entries": {}}', b'{"version": 1, "entries": []}'])
def test_a_damaged_stat_cache_is_ignored(tmp_path, content):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    (tmp_path / statcache.STATE_NAME).write_bytes(content)
    assert statcache.StatCache(tmp_path).file(f) == sha256_file(f)


def test_a_symlinked_stat_cache_is_not_followed(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / statcache.STATE_NAME).symlink_to(elsewhere)
    c = statcache.StatCache(out)
    c.file(f)
    c.save()
    assert elsewhere.read_text() == "{}"  # replaced the link, never wrote through it
    assert not (out / statcache.STATE_NAME).is_symlink()
