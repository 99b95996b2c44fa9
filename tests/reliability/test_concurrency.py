"""Two ``apply`` runs on one output folder: the second fails fast (--no-wait, exit 4) or waits its turn and then
finds nothing to do; a lock left by a SIGKILLed run never blocks the next one.

The first run is frozen with SIGSTOP while it holds the run lock, so the overlap is certain, not a race.
"""
from __future__ import annotations

import re
import time

from tests.reliability._util import (ARTIFACTS, stable_lock, START_RE, Child, assert_one_line_error, cli, count, sha, snapshot,
                                     temp_files)


def _state(project) -> dict:
    """Every file in the output folder and the lock (the run lock's pid file and the stat cache aside)."""
    def skip(p):
        return p.name in (".reidbuild.pid", ".reidbuild-hashes.json") or not (
            p in (project.root / "m.lock", project.out) or project.out in p.parents)

    return snapshot(project.root, skip=skip)


def test_second_apply_fails_fast_with_no_wait_or_waits_and_finds_nothing_to_do(project):
    first = Child.apply(project.manifest, "--force")
    try:
        assert first.wait_line(lambda ln: ln.startswith("==> onnx.export: running")), first.err()
        first.stop()  # holding the lock, mid-build
        frozen = _state(project)
        # --no-wait: exit 4 at once, naming the holder
        code, out, err = cli("apply", "--no-wait", project.manifest)
        line = assert_one_line_error(code, err, 4, "another reidbuild run")
        assert f"(pid {first.proc.pid})" in line
        assert not [ln for ln in err.splitlines() if START_RE.match(ln)], "the refused run started a stage"
        # default: wait with a message, while the first is still frozen
        second = Child.apply(project.manifest)
        msg = second.wait_line(lambda ln: "waiting for another reidbuild run" in ln)
        assert msg and f"pid {first.proc.pid}" in msg, second.err()
        assert first.proc.poll() is None and second.proc.poll() is None
        time.sleep(1.0)
        assert _state(project) == frozen, "a run wrote to the output folder or the lock without holding the lock"
        first.cont()
        assert first.finish() == 0, first.err()
        assert second.finish() == 0, second.err()
    finally:
        for c in [first] + ([second] if "second" in locals() else []):
            if c.proc.poll() is None:
                c.cont()
                c.kill9()
    # the second run only read the lock after the first committed everything: it ran no stage at all
    assert "nothing to do" in second.out(), second.out()
    assert not [ln for _, ln in second.lines if START_RE.match(ln)], second.err()
    assert {n: sha(project.out / n) for n in ARTIFACTS} == project.artifacts
    assert stable_lock((project.root / "m.lock").read_text()) == stable_lock(project.lock_text)
    assert not temp_files(project.out, project.root)
    code, out, _ = cli("verify", project.manifest)
    assert code == 0, out
    count("concurrency: overlapping apply runs")


def test_stale_lock_of_a_killed_run_does_not_block(project):
    """(The crash suite also runs every apply after a kill with --no-wait.)"""
    first = Child.apply(project.manifest, "--force")
    assert first.wait_line(lambda ln: ln.startswith("==> load: running")), first.err()
    assert first.kill9()
    pidfile = project.out / ".reidbuild.pid"
    assert pidfile.read_text().strip() == str(first.proc.pid)  # the dead run's pid is still in the file
    code, out, err = cli("apply", "--no-wait", project.manifest)
    assert code == 0, err
    assert "nothing to do" in out and not re.search(r"waiting for another", err)
    assert {n: sha(project.out / n) for n in ARTIFACTS} == project.artifacts
