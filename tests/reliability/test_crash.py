"""Crash safety: ``kill -9`` of a real ``reidbuild apply`` at many moments, in every stage.

The scenario: the output folder holds a complete, locked build A (seed 1) and the manifest now asks for
build B (seed 2), or the folder is empty. ``apply`` is started as a real subprocess and SIGKILLed at an
offset after a stage's ``==> <stage>: running`` line (offsets spread over that stage's measured duration,
including its commit), or during startup, or at exact commit points (after an artifact's rename but before
the lock's; in the middle of a lock write). After every kill:

* every artifact file is complete: absent, or byte-equal to build A's or build B's file of that name;
  no temp file (``.NAME.tmp-PID-X``) is ever named by the lock; the lock parses;
* ``reidbuild verify`` fails whenever a file the lock names differs from the lock, and passes only on a
  complete, consistent build (then everything equals build B);
then a later ``apply`` finishes the build: exit 0, temp files cleaned, ``verify`` passes, artifacts and the
lock are byte-identical to a clean build of B.

Kills are chained (a killed run's successor is the next trial's run), and two chains run at once, to keep
the suite fast; every chain ends with an ``apply`` that must finish the build. Every run after a kill uses
``--no-wait``, so a run lock left behind by the killed process would fail it (exit 4) instead of blocking.
"""
from __future__ import annotations

import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from reidbuild import lockfile
from reidbuild.lockfile import iter_artifacts
from tests.helpers import tiny_manifest
from tests.reliability._util import (ARTIFACTS, STAGES, START_RE, VOLATILE, Child, child_env, cli, count, sha,
                                    stable_lock, temp_files)

SEED_NEW = 2
# offsets after a stage's start line, as fractions of its measured duration; > 1 lands in its commit (writing
# and fsyncing the artifact, then the lock) or in the gap before the next stage
FRACTIONS = (0.0, 0.15, 0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 0.6, 0.2, 0.4, 0.8)
TIMED_CHAINS = (  # (start state, kill once during startup first?)
    ("old", True), ("old", False), ("clean", False), ("old", False), ("clean", True),
)
# exact commit points: right after os.replace() put the file in place (the artifact is new, the lock still
# describes the old one), or right after a temp file was fsynced but before its rename
EXACT_POINTS = (("after_replace", "tiny.fastreid.json"), ("after_replace", "tiny.export.onnx"),
                ("after_replace", "tiny.onnx"), ("after_fsync", "m.lock"))


@dataclass
class Ref:
    artifacts: dict[str, str]
    lock_text: str
    durations: dict[str, float]  # stage -> seconds it ran in a clean build


@pytest.fixture(scope="module")
def ref_b(tmp_path_factory) -> Ref:
    """A clean build of B: the reference bytes, and the stage durations the kills are spread over."""
    import json

    root = tmp_path_factory.mktemp("clean_b")
    m = tiny_manifest(root, weights=f"{{random: {{seed: {SEED_NEW}}}}}")
    code, out, err = cli("apply", "--json", m)
    assert code == 0, err
    done = {e["stage"]: e["seconds"] for e in json.loads(out)["events"] if e["kind"] == "done"}
    assert list(done) == list(STAGES)
    return Ref({n: sha(root / "out" / n) for n in ARTIFACTS}, (root / "m.lock").read_text(),
               {s: max(done[s], 0.05) for s in STAGES})


class Trial:
    """The project being crashed: its manifest asks for B; ``reset`` puts build A (or nothing) in place."""

    def __init__(self, root: Path, built, ref: Ref) -> None:
        self.root, self.built, self.ref = root, built, ref
        self.m = tiny_manifest(root, weights=f"{{random: {{seed: {SEED_NEW}}}}}")
        self.out, self.lock = root / "out", root / "m.lock"
        self.kills: list[str] = []

    def reset(self, state: str) -> None:
        shutil.rmtree(self.out, ignore_errors=True)
        self.lock.unlink(missing_ok=True)
        if state == "old":
            shutil.copytree(self.built.out, self.out)
            shutil.copy(self.built.root / "m.lock", self.lock)

    def check_after_kill(self, where: str) -> None:
        a, b = self.built.artifacts, self.ref.artifacts
        ctx = f"after a kill at {where}"
        names = {p.name for p in self.out.iterdir()} if self.out.exists() else set()
        temps = {p.name for p in temp_files(self.out)}
        for n in sorted(names - temps - {".reidbuild.pid", ".reidbuild-hashes.json"}):  # run lock, stat cache
            assert n in ARTIFACTS + VOLATILE, f"{ctx}: unexpected file {n} in the output folder"
            if n in VOLATILE:
                assert (self.out / n).read_text().rstrip().endswith("</html>"), f"{ctx}: {n} is a partial file"
                continue
            h = sha(self.out / n)
            assert h in (a[n], b[n]), f"{ctx}: {n} is neither build A's nor build B's bytes (a partial file)"
        lock = lockfile.read(self.lock)  # parses: the lock is written atomically too
        named = {f: e["sha256"] for _, f, e in iter_artifacts(lock)} if lock else {}
        for f, h in named.items():
            assert f in ARTIFACTS + VOLATILE, f"{ctx}: the lock names {f}"
            assert f in VOLATILE or h in (a[f], b[f]), f"{ctx}: the lock records a sha256 for {f} that no complete build has"
        stale = [f for f, h in named.items() if not (self.out / f).is_file() or sha(self.out / f) != h]
        code, out, err = cli("verify", self.m)
        if stale:
            assert code == 1, f"{ctx}: verify passed although {stale} differ from the lock"
        if code == 0:
            assert stable_lock(self.lock.read_text()) == stable_lock(self.ref.lock_text), \
                f"{ctx}: verify passed on an incomplete lock"
            got = {n: sha(self.out / n) for n in ARTIFACTS}
            assert got == b, f"{ctx}: verify passed on a mix of builds: {out}"
        else:
            assert code == 1, f"{ctx}: verify exit {code}: {err}"

    def finish_and_check(self) -> None:
        code, out, err = cli("apply", "--no-wait", self.m)  # the killed run's lock must not block
        assert code == 0, err
        assert not temp_files(self.out, self.root), "temp files left after a successful apply"
        code, out, err = cli("verify", self.m)
        assert code == 0, out + err
        assert {n: sha(self.out / n) for n in ARTIFACTS} == self.ref.artifacts
        assert stable_lock(self.lock.read_text()) == stable_lock(self.ref.lock_text)

    def kill_at_stage(self, first: int, fraction: float) -> bool:
        """Run apply; SIGKILL ``fraction`` of a stage's duration after the first of STAGES[first:] starts."""
        child = Child.apply(self.m, "--no-wait")  # a previous run's stale lock must not block (exit 4)
        wanted = set(STAGES[first:])
        line = child.wait_line(lambda ln: bool(START_RE.match(ln)) and START_RE.match(ln).group(1) in wanted)
        if line is None:  # nothing of that was left to run: it finished
            assert child.finish() == 0, child.err()
            return False
        time.sleep(fraction * self.ref.durations[START_RE.match(line).group(1)])
        return self._kill(child)

    def kill_during_startup(self, seconds: float) -> bool:
        child = Child.apply(self.m, "--no-wait")
        time.sleep(seconds)
        return self._kill(child)

    def kill_at_commit(self, when: str, target: str) -> None:
        child = Child([sys.executable, "-c", _WRAPPER, str(self.m)], child_env(RB_KILL_WHEN=when, RB_KILL_FILE=target))
        child.finish()
        assert child.proc.returncode == -9, f"{when} {target}: {child.err()}"
        where = f"{when}:{target}"
        self.kills.append(where)
        self.check_after_kill(where)
        if when == "after_replace":  # the artifact is new, the lock still has the old sha256
            rec = {f: e["sha256"] for _, f, e in iter_artifacts(lockfile.read(self.lock))}
            assert sha(self.out / target) == self.ref.artifacts[target] != rec[target]
        else:  # a complete temp lock that was never renamed: ignored, then cleaned by the next run
            assert any(p.name.startswith(f".{target}.tmp-") for p in temp_files(self.root))

    def _kill(self, child: Child) -> bool:
        """True if it died of the kill; False if it had already finished (successfully) by then."""
        if not child.kill9():
            assert child.proc.returncode == 0, child.err()
            return False
        where = child.hit()
        self.kills.append(where)
        self.check_after_kill(where)
        return True


# Runs the real CLI in a child that SIGKILLs itself at an exact point of fsutil.atomic_write.
_WRAPPER = r"""
import os, sys, runpy, signal
when, target = os.environ["RB_KILL_WHEN"], os.environ["RB_KILL_FILE"]
_replace, _fsync = os.replace, os.fsync
def replace(src, dst, *a, **k):
    _replace(src, dst, *a, **k)
    if when == "after_replace" and os.path.basename(str(dst)) == target:
        os.kill(os.getpid(), signal.SIGKILL)
def fsync(fd):
    _fsync(fd)
    if when == "after_fsync" and os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("." + target + ".tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace, os.fsync = replace, fsync
sys.argv = ["reidbuild", "apply", "--no-wait", sys.argv[1]]
runpy.run_module("reidbuild.cli", run_name="__main__")
"""


def _timed_chain(trial: Trial, c: int, state: str, startup: bool) -> list[str]:
    trial.reset(state)
    attempts = [lambda: trial.kill_during_startup(0.3 + 0.4 * c / len(TIMED_CHAINS))] if startup else []
    attempts += [lambda s=s: trial.kill_at_stage(s, FRACTIONS[(c * 5 + s * 3) % len(FRACTIONS)])
                 for s in range(len(STAGES))]
    for attempt in attempts:
        if not attempt():  # the run finished before the kill: check that build, start over, try again
            trial.finish_and_check()
            trial.reset(state)
            attempt()
    trial.finish_and_check()
    return trial.kills


def _exact_chain(trial: Trial) -> list[str]:
    trial.reset("old")
    for when, target in EXACT_POINTS:
        trial.kill_at_commit(when, target)
    trial.finish_and_check()
    return trial.kills


def test_kill_9_anywhere_leaves_old_or_new_files_and_the_next_apply_finishes(built, ref_b, tmp_path):
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(_exact_chain, Trial(tmp_path / "exact", built, ref_b))]
        jobs += [pool.submit(_timed_chain, Trial(tmp_path / f"chain{c}", built, ref_b), c, state, startup)
                 for c, (state, startup) in enumerate(TIMED_CHAINS)]
        exact, *timed = [j.result() for j in jobs]
    hits = [h for chain in timed for h in chain]
    print(f"\ncrash: {len(hits)} timed kill -9 points: "
          + ", ".join(f"{s}={hits.count(s)}" for s in sorted(set(hits)))
          + f"; {len(exact)} at exact commit points")
    count("crash: kill -9 points (timed, spread over every stage)", len(hits))
    count("crash: kill -9 points (exact commit boundaries)", len(exact))
    missed = [s for s in STAGES if s not in hits]
    assert not missed, f"no kill landed while {missed} was running: {hits}"
    assert len(hits) >= 20, hits
    assert len(exact) == len(EXACT_POINTS)
