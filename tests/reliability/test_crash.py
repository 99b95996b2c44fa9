"""Crash safety: ``kill -9`` of a real ``reidbuild apply`` at many moments, in every stage kind.

The scenario: the output folder holds a complete, locked build A and the manifest now asks for build B, or the
folder is empty. ``apply`` is started as a real subprocess and SIGKILLed at an offset after a stage's
``==> <stage>: running`` line (offsets spread over that stage's measured duration, including its commit), or
during startup, or at exact commit points (a stage's artifact temp file fsynced but not renamed; an artifact
renamed into place but the lock not yet rewritten, also between two artifacts of one stage; the lock's temp file
fsynced but not renamed; right after the lock was rewritten for one stage, before the next stage). After every
kill:

* every artifact file is complete: absent, or byte-equal to build A's or build B's file of that name;
  no temp file (``.NAME.tmp-PID-X``) is ever named by the lock; the lock parses;
* ``reidbuild verify`` fails whenever a file the lock names differs from the lock, and passes only on a
  complete, consistent build (then everything equals build B);
then a later ``apply`` finishes the build: exit 0, temp files cleaned, ``verify`` passes, artifacts and the
lock are byte-identical to a clean build of B.

Two projects are crashed. The tiny one (``tests.helpers.tiny_manifest``: load, ONNX export and simplify,
onnxruntime parity, report) goes from seed 1 to seed 2. The rich one runs every stage kind a CPU machine can:
R18 at 64x32 with trained-like weights, an ONNX patch (L2-normalised output), a bvlc-dialect Caffe net with a
Caffe patch (a renamed layer), real pycaffe parity, the reduced-precision ONNX for TensorRT (fp16 in one build,
int8 calibrated on 8 images in the other, each with its parity check) and the CPU int8 ONNX with its check; it
goes from the fp16 build to the int8 build and back. Its ``tensorrt.engine`` stage is recorded as skipped
(``--skip-unavailable``); TensorRT is hidden from its runs even where installed, because an engine is not
byte-reproducible (``tests/gpu`` covers it).

Kills are chained (a killed run's successor is the next trial's run), and two chains run at once, to keep
the suite fast; every chain ends with an ``apply`` that must finish the build. Every run after a kill uses
``--no-wait``, so a run lock left behind by the killed process would fail it (exit 4) instead of blocking.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from reidbuild import lockfile
from reidbuild.lockfile import iter_artifacts
from tests.helpers import TINY_CONFIG, tiny_manifest, write
from tests.reliability._util import (ARTIFACTS, STAGES, START_RE, VOLATILE, Child, child_env, cli, count, floor,
                                    run_cli, sha, stable_lock, temp_files)

# offsets after a stage's start line, as fractions of its measured duration; > 1 lands in its commit (writing
# and fsyncing the artifact, then the lock) or in the gap before the next stage
FRACTIONS = (0.0, 0.15, 0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 0.6, 0.2, 0.4, 0.8)
TINY_CHAINS = (("old", True), ("clean", False))  # (start state, kill once during startup first?)
# the floors this test asserts (README "Reliability" and tests/reliability/COUNTS.md quote them)
MIN_TIMED_KILLS = floor("crash: timed kills")
MIN_EXACT_KILLS = floor("crash: exact commit-point kills")
# every stage kind a CPU machine runs, each of which must have been killed while it was running
STAGE_KINDS = ("load", "onnx.export", "onnx.simplify", "onnx.patch", "caffe.convert", "caffe.patch",
               "precision.fp16", "parity.onnx_fp16", "precision.int8", "parity.onnx_int8", "precision.int8_cpu",
               "parity.onnx_int8_cpu", "parity.onnxruntime", "parity.caffe", "report")


@dataclass
class Build:
    """A complete, locked build: its folder, artifact hashes, lock text, and the stages it ran with their times."""

    root: Path
    key: str  # which build of its project (the argument of Project.write)
    artifacts: dict[str, str]
    lock_text: str
    durations: dict[str, float] = field(default_factory=dict)  # stage -> seconds, in run order

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.durations)


@dataclass
class Project:
    """How to lay out one of the crashed projects in a folder and how to run ``apply`` on it."""

    write: Callable[[Path, str], Path]  # (folder, build key) -> manifest
    volatile: tuple[str, ...]  # artifacts whose bytes differ run to run (checked for being whole instead)
    args: tuple[str, ...] = ()  # extra arguments of every apply
    env: dict[str, str] = field(default_factory=child_env)

    def apply(self, manifest: Path, *args: str) -> tuple[int, str, str]:
        if not self.args:  # in this process: faster
            return cli("apply", *args, manifest)
        r = run_cli("apply", *self.args, *args, manifest, env=self.env, timeout=300)
        return r.returncode, r.stdout, r.stderr

    def reference(self, root: Path, key: str) -> Build:
        """A clean build: the reference bytes, and the stage durations the kills are spread over."""
        m = self.write(root, key)
        code, out, err = self.apply(m, "--json")
        assert code == 0, err[-3000:]
        done = {e["stage"]: max(e["seconds"], 0.05) for e in json.loads(out)["events"] if e["kind"] == "done"}
        arts = {f: e["sha256"] for _, f, e in iter_artifacts(lockfile.read(root / "m.lock")) if f not in self.volatile}
        assert arts and all(sha(root / "out" / f) == h for f, h in arts.items())
        return Build(root, key, arts, (root / "m.lock").read_text(), done)


# ----------------------------------------------------------------------------------------------- the projects

TINY = Project(lambda root, seed: tiny_manifest(root, weights=f"{{random: {{seed: {seed}}}}}"), VOLATILE)

RICH_H, RICH_W = 64, 32
RICH_BUILDS = {"fp16": 2, "int8": 1}  # build key (the TensorRT mode) -> seed of its trained-like checkpoint
ONNX_PATCH = "format: onnx\nchanges_output: l2_normalize\nops:\n  - op: l2_normalize_output\n"
CAFFE_PATCH = "format: caffe\nops:\n  - op: rename_node\n    select: {name: /backbone/conv1/Conv}\n    to: stem_conv\n"
RICH_MANIFEST = """\
    version: 1
    name: rich
    source: {{format: fastreid, config: cfg/config.yml, weights: w{seed}.pth}}
    input: {{height: {h}, width: {w}}}
    output_dir: out
    targets:
      onnx: {{patches: [patches/onnx.yml]}}
      caffe: {{dialect: bvlc, patches: [patches/caffe.yml]}}
      tensorrt:
        mode: {mode}
        batch_size: 4
        height: {h}
        width: {w}
        calibration: {{images: calib/*.png, batches: 2}}
      onnx_int8_cpu:
        batch_size: 4
        calibration: {{images: calib/*.png, batches: 2}}
    parity:
      images: imgs/*.png
      backends: [onnxruntime, caffe]
    """


def _pngs(folder: Path, images: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(np.clip(np.round(img.transpose(1, 2, 0)), 0, 255).astype(np.uint8), "RGB").save(
            folder / f"p{i:02d}.png")


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> Project:
    """The rich project's inputs (made once: trained-like checkpoints, images, patches) and its runner, whose
    child processes cannot import TensorRT."""
    from reidbuild.fastreid import build_model
    from reidbuild.fastreid.checkpoint import make_checkpoint
    from reidbuild.fastreid.config import load_config
    from reidbuild.testing import make_trained_like, person_like_images

    src = tmp_path_factory.mktemp("rich_src")
    write(src / "cfg" / "config.yml", TINY_CONFIG)
    write(src / "patches" / "onnx.yml", ONNX_PATCH)
    write(src / "patches" / "caffe.yml", CAFFE_PATCH)
    for seed in RICH_BUILDS.values():
        model = build_model(load_config(src / "cfg" / "config.yml"))
        make_trained_like(model, person_like_images(32, RICH_H, RICH_W, seed=1), seed=seed)
        make_checkpoint(model, src / f"w{seed}.pth")
    _pngs(src / "imgs", person_like_images(5, RICH_H, RICH_W, seed=2))
    _pngs(src / "calib", person_like_images(8, RICH_H, RICH_W, seed=5))
    hide = tmp_path_factory.mktemp("no_tensorrt") / "tensorrt"
    write(hide / "__init__.py", "raise ImportError('TensorRT is hidden from the crash test: engines are not "
                                "byte-reproducible')\n")

    def lay_out(root: Path, key: str) -> Path:
        if not (root / "cfg").exists():
            shutil.copytree(src, root, dirs_exist_ok=True)
        return write(root / "m.yml", textwrap.dedent(RICH_MANIFEST).format(
            seed=RICH_BUILDS[key], mode=key, h=RICH_H, w=RICH_W))

    env = child_env(PYTHONPATH=os.pathsep.join([child_env()["PYTHONPATH"], str(hide.parent)]))
    return Project(lay_out, ("rich.report.html",), ("--skip-unavailable",), env)


@pytest.fixture(scope="module")
def tiny_builds(built, tmp_path_factory) -> tuple[Build, Build]:
    """The session's clean tiny build (seed 1) as build A, and a clean build of seed 2 as build B."""
    a = Build(built.root, "1", dict(built.artifacts), built.lock_text)
    return a, TINY.reference(tmp_path_factory.mktemp("tiny_b"), "2")


@pytest.fixture(scope="module")
def rich_builds(rich, tmp_path_factory) -> dict[str, Build]:
    builds = {k: rich.reference(tmp_path_factory.mktemp(f"rich_{k}"), k) for k in RICH_BUILDS}
    for b in builds.values():  # what the rich project is for: every stage kind ran, Caffe on real pycaffe
        lock = lockfile.read(b.root / "m.lock")
        assert lock.stages["tensorrt.engine"].status == "skipped"
        assert lock.stages["parity.caffe"].record["backend"]["runtime"] == "pycaffe", lock.stages["parity.caffe"].record
        assert all(r.status == "ok" for s, r in lock.stages.items() if s != "tensorrt.engine")
    assert set(STAGE_KINDS) == set(builds["fp16"].stages) | set(builds["int8"].stages)
    return builds


# ------------------------------------------------------------------------------------------------- the trial

_HASHED: dict[tuple[str, int, int, int, int], str] = {}


def _sha(path: Path) -> str:
    """sha256 of an artifact, hashed again only when its inode, size or times changed: reidbuild replaces a file
    (a new inode) and never writes into one, and the rich build's ~300 MB would otherwise be hashed after
    every kill."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha(path)
    return _HASHED[key]


class Trial:
    """The project being crashed: its manifest asks for ``new``; ``reset`` puts ``old`` (or nothing) in place."""

    def __init__(self, root: Path, project: Project, old: Build, new: Build) -> None:
        self.root, self.project, self.old, self.new = root, project, old, new
        self.m = project.write(root, new.key)
        self.out, self.lock = root / "out", root / "m.lock"
        self.kills: list[str] = []  # where each kill landed: a stage that was running, 'startup' or 'after X'

    def reset(self, state: str) -> None:
        shutil.rmtree(self.out, ignore_errors=True)
        self.lock.unlink(missing_ok=True)
        if state == "old":
            shutil.copytree(self.old.out, self.out)
            shutil.copy(self.old.root / "m.lock", self.lock)

    def check_after_kill(self, where: str) -> None:
        a, b, volatile = self.old.artifacts, self.new.artifacts, self.project.volatile
        ctx = f"after a kill at {where}"
        names = {p.name for p in self.out.iterdir()} if self.out.exists() else set()
        temps = {p.name for p in temp_files(self.out)}
        for n in sorted(names - temps - {".reidbuild.pid", ".reidbuild-hashes.json"}):  # run lock, stat cache
            assert n in {**a, **b} or n in volatile, f"{ctx}: unexpected file {n} in the output folder"
            if n in volatile:
                assert (self.out / n).read_text().rstrip().endswith("</html>"), f"{ctx}: {n} is a partial file"
                continue
            assert _sha(self.out / n) in (a.get(n), b.get(n)), \
                f"{ctx}: {n} is neither build A's nor build B's bytes (a partial file)"
        lock = lockfile.read(self.lock)  # parses: the lock is written atomically too
        named = {f: e["sha256"] for _, f, e in iter_artifacts(lock)} if lock else {}
        for f, h in named.items():
            assert f in {**a, **b} or f in volatile, f"{ctx}: the lock names {f}"
            assert f in volatile or h in (a.get(f), b.get(f)), \
                f"{ctx}: the lock records a sha256 for {f} that no complete build has"
        stale = [f for f, h in named.items() if not (self.out / f).is_file() or _sha(self.out / f) != h]
        code, out, err = cli("verify", self.m)
        if stale:
            assert code == 1, f"{ctx}: verify passed although {stale} differ from the lock"
        if code == 0:
            assert stable_lock(self.lock.read_text()) == stable_lock(self.new.lock_text), \
                f"{ctx}: verify passed on an incomplete lock"
            got = {n: _sha(self.out / n) for n in b}
            assert got == b, f"{ctx}: verify passed on a mix of builds: {out}"
        else:
            assert code == 1, f"{ctx}: verify exit {code}: {err}"

    def finish_and_check(self) -> None:
        code, out, err = self.project.apply(self.m, "--no-wait")  # the killed run's lock must not block
        assert code == 0, err[-3000:]
        assert not temp_files(self.out, self.root), "temp files left after a successful apply"
        code, out, err = cli("verify", self.m)
        assert code == 0, out + err
        assert {n: _sha(self.out / n) for n in self.new.artifacts} == self.new.artifacts
        assert stable_lock(self.lock.read_text()) == stable_lock(self.new.lock_text)

    def child(self, *extra: str) -> Child:
        return Child([sys.executable, "-m", "reidbuild.cli", "apply", "--no-wait", *self.project.args, *extra,
                      str(self.m)], self.project.env)

    def kill_at_stage(self, first: int, fraction: float) -> bool:
        """Run apply; SIGKILL ``fraction`` of a stage's duration after the first of stages[first:] starts."""
        child = self.child()  # a previous run's stale lock must not block (exit 4)
        wanted = set(self.new.stages[first:])
        line = child.wait_line(lambda ln: bool(START_RE.match(ln)) and START_RE.match(ln).group(1) in wanted)
        if line is None:  # nothing of that was left to run: it finished
            assert child.finish() == 0, child.err()
            return False
        time.sleep(fraction * self.new.durations[START_RE.match(line).group(1)])
        return self._kill(child)

    def kill_during_startup(self, seconds: float) -> bool:
        child = self.child()
        time.sleep(seconds)
        return self._kill(child)

    def kill_at_commit(self, when: str, target: str, nth: int = 1) -> None:
        """Run apply in a child that SIGKILLs itself at the ``nth`` ``when`` event of file ``target``."""
        env = {**self.project.env, "RB_KILL_WHEN": when, "RB_KILL_FILE": target, "RB_KILL_NTH": str(nth)}
        child = Child([sys.executable, "-c", _WRAPPER, "apply", "--no-wait", *self.project.args, str(self.m)], env)
        child.finish(300)
        assert child.proc.returncode == -9, f"{when} {target}: {child.err()[-3000:]}"
        self.kills.append(child.hit())
        self.check_after_kill(f"{when}:{target}#{nth} (in {child.hit()})")
        if when == "after_replace" and target != self.lock.name:  # the artifact is new, the lock still the old one
            rec = {f: e["sha256"] for _, f, e in iter_artifacts(lockfile.read(self.lock))}
            assert target in self.project.volatile or _sha(self.out / target) == self.new.artifacts[target]
            if self.old.artifacts.get(target) != self.new.artifacts.get(target):  # (a prototxt has no weights)
                assert rec.get(target) != self.new.artifacts.get(target)
        elif when == "after_fsync":  # a complete temp file that was never renamed: ignored, then cleaned
            folder = self.root if target == self.lock.name else self.out
            assert any(p.name.startswith(f".{target}.tmp-") for p in temp_files(folder))

    def _kill(self, child: Child) -> bool:
        """True if it died of the kill; False if it had already finished (successfully) by then."""
        if not child.kill9():
            assert child.proc.returncode == 0, child.err()
            return False
        where = child.hit()
        self.kills.append(where)
        self.check_after_kill(where)
        return True


# Runs the real CLI (its arguments after -c) in a child that SIGKILLs itself at an exact point of
# fsutil.atomic_write: right after the nth os.replace() onto RB_KILL_FILE, or right after the nth fsync of a temp
# file of RB_KILL_FILE (before its rename).
_WRAPPER = r"""
import os, sys, runpy, signal
when, target, nth = os.environ["RB_KILL_WHEN"], os.environ["RB_KILL_FILE"], int(os.environ["RB_KILL_NTH"])
seen = [0]
_replace, _fsync = os.replace, os.fsync
def hit():
    seen[0] += 1
    if seen[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
def replace(src, dst, *a, **k):
    _replace(src, dst, *a, **k)
    if when == "after_replace" and os.path.basename(str(dst)) == target:
        hit()
def fsync(fd):
    _fsync(fd)
    if when == "after_fsync" and os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("." + target + ".tmp-"):
        hit()
os.replace, os.fsync = replace, fsync
sys.argv = ["reidbuild", *sys.argv[1:]]
runpy.run_module("reidbuild.cli", run_name="__main__")
"""


# ------------------------------------------------------------------------------------------------ the chains

def _timed_chain(trial: Trial, c: int, state: str, startup: bool, only: tuple[str, ...] = ()) -> list[str]:
    """Kill once during startup (optionally), then once in (or just after) each stage of the new build (or each
    of ``only``)."""
    trial.reset(state)
    attempts = [lambda: trial.kill_during_startup(0.3 + 0.4 * c / len(TINY_CHAINS))] if startup else []
    attempts += [lambda s=s: trial.kill_at_stage(s, FRACTIONS[(c * 5 + s * 3) % len(FRACTIONS)])
                 for s, name in enumerate(trial.new.stages) if not only or name in only]
    for attempt in attempts:
        if not attempt():  # the run finished before the kill: check that build, start over, try again
            trial.finish_and_check()
            trial.reset(state)
            attempt()
    trial.finish_and_check()
    return trial.kills


def _exact_chain(trial: Trial, points: list[tuple[str, str, int]]) -> list[str]:
    trial.reset("old")
    for when, target, nth in points:
        trial.kill_at_commit(when, target, nth)
    trial.finish_and_check()
    return trial.kills


def _rich_points(new: Build, stages: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """One exact commit point inside each of ``stages`` of ``new`` (the chain resumes at the first stage the
    last kill left uncommitted, so each lands in its stage), cycling through: the artifact's temp file fsynced
    but not renamed; the first artifact renamed into place (for two-file stages, before the second one), lock
    not rewritten; the last artifact renamed, lock not rewritten. Between them: the lock's temp file fsynced
    but not renamed, and the kill right after a run's first lock rewrite (between one stage's commit and the
    next stage)."""
    lock = lockfile.read(new.root / "m.lock")
    points: list[tuple[str, str, int]] = []
    for i, s in enumerate(stages):
        files = sorted(lock.stages[s].outputs)  # written in the stage's declared order; either is a commit point
        when, f = [("after_fsync", files[0]), ("after_replace", files[0]), ("after_replace", files[-1])][i % 3]
        points.append((when, f, 1))
        if i == 1:
            points.append(("after_fsync", "m.lock", 1))
        if i in (3, 8):
            points.append(("after_replace", "m.lock", 1))
    return points


def test_kill_9_anywhere_leaves_old_or_new_files_and_the_next_apply_finishes(tiny_builds, rich, rich_builds,
                                                                              tmp_path):
    a, b = tiny_builds
    fp16, int8 = rich_builds["fp16"], rich_builds["int8"]
    fp16_only = tuple(s for s in fp16.stages if s not in int8.stages)  # precision.fp16, parity.onnx_fp16
    tiny_exact = [("after_replace", n, 1) for n in ARTIFACTS[:3]] + [("after_fsync", "m.lock", 1),
                                                                      ("after_replace", "m.lock", 2)]
    exact_jobs = [  # (trial, points)
        (Trial(tmp_path / "exact_int8", rich, fp16, int8), _rich_points(int8, int8.stages)),
        (Trial(tmp_path / "exact", TINY, a, b), tiny_exact),
        (Trial(tmp_path / "exact_fp16", rich, int8, fp16), _rich_points(fp16, fp16_only)),
    ]
    timed_jobs = [(Trial(tmp_path / "rich_to_int8", rich, fp16, int8), 1, "old", True)]
    timed_jobs += [(Trial(tmp_path / f"chain{c}", TINY, a, b), c, state, startup)
                   for c, (state, startup) in enumerate(TINY_CHAINS)]
    timed_jobs += [(Trial(tmp_path / "rich_to_fp16", rich, int8, fp16), 2, "old", False, fp16_only)]
    with ThreadPoolExecutor(2) as pool:  # the two longest chains first
        exact_f = [pool.submit(_exact_chain, *exact_jobs[0])]
        timed_f = [pool.submit(_timed_chain, *job) for job in timed_jobs[:1]]
        exact_f += [pool.submit(_exact_chain, *job) for job in exact_jobs[1:]]
        timed_f += [pool.submit(_timed_chain, *job) for job in timed_jobs[1:]]
        exact = [h for f in exact_f for h in f.result()]
        timed = [h for f in timed_f for h in f.result()]
    print(f"\ncrash: {len(timed)} timed kill -9 points: "
          + ", ".join(f"{s}={timed.count(s)}" for s in sorted(set(timed)))
          + f"; {len(exact)} at exact commit points: " + ", ".join(f"{s}={exact.count(s)}" for s in sorted(set(exact))))
    count("crash: kill -9 points (timed, spread over every stage)", len(timed))
    count("crash: kill -9 points (exact commit points)", len(exact))
    count("crash: stage kinds killed while running", len(set(STAGE_KINDS) & set(timed + exact)))
    assert len(exact) == sum(len(pts) for _, pts in exact_jobs) >= MIN_EXACT_KILLS, exact
    missed = [s for s in STAGES if s not in timed]  # the stages both projects run: each killed at a timed point
    assert not missed, f"no timed kill landed while {missed} was running: {timed}"
    assert len(STAGE_KINDS) >= floor("crash: stage kinds killed while running")
    missed = [s for s in STAGE_KINDS if s not in timed + exact]
    assert not missed, f"no kill landed while {missed} was running: timed {timed}, exact {exact}"
    assert len(timed) >= MIN_TIMED_KILLS, timed
