"""Shared helpers for the reliability suite: CLI runners (in-process and real subprocesses), project copies,
tree snapshots, and the counters that end up in COUNTS.md / the README's "Reliability" section."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from click.testing import CliRunner

from tests import helpers

REPO = Path(__file__).resolve().parents[2]

# counters reported at the end of the session (conftest.pytest_terminal_summary) and copied into COUNTS.md
COUNTS: dict[str, int] = {}


@dataclass(frozen=True)
class Floor:
    """A number README "Reliability" and COUNTS.md quote; the counters (COUNTS key prefixes) whose sum must reach
    it when the ``modules`` that count them run whole (test_counts.py). Tests that count in one loop assert their
    floor themselves too."""

    value: int
    counters: tuple[str, ...]
    modules: tuple[str, ...]


FLOORS: dict[str, Floor] = {
    "crash: timed kills": Floor(24, ("crash: kill -9 points (timed",), ("test_crash.py",)),
    "crash: exact commit-point kills": Floor(24, ("crash: kill -9 points (exact",), ("test_crash.py",)),
    "crash: stage kinds killed while running": Floor(15, ("crash: stage kinds",), ("test_crash.py",)),
    "bad inputs refused": Floor(96, ("inputs: bad", "checkpoints: ", "paths: bad names"),
                                ("test_inputs.py", "test_checkpoints.py", "test_paths.py")),
    "odd valid images accepted": Floor(12, ("inputs: odd valid images",), ("test_inputs.py",)),
    "planted symlinks not followed": Floor(13, ("paths: planted symlinks",), ("test_paths.py",)),
    "tampering caught": Floor(20, ("tamper: single flipped", "tamper: replaced", "tamper: edited",
                                   "tamper: tool version"), ("test_tamper.py",)),
    "corrupted outputs caught by parity": Floor(23, ("parity: ",), ("test_parity.py",)),
    "property-based examples": Floor(1620, ("property examples: ",), ("test_properties.py",)),
}


# reliability test modules collected whole in this session (conftest.pytest_collection_modifyitems)
WHOLE_MODULES: set[str] = set()
DESELECTED_MODULES: set[str] = set()  # ... and those with a deselected test (conftest.pytest_deselected)


def floor(name: str) -> int:
    return FLOORS[name].value

# the tiny build (tests.helpers.tiny_manifest): its stages and artifact files
STAGES = ("load", "onnx.export", "onnx.simplify", "parity.onnxruntime", "report")
ARTIFACTS = ("tiny.fastreid.json", "tiny.export.onnx", "tiny.onnx", "tiny.parity.onnxruntime.npz")
# the HTML report records each run's stage timings: its bytes differ run to run (checked for being whole, not
# for its bytes), as do the lock's ``seconds`` and the report's sha256 in it (see ``stable_lock``)
VOLATILE = ("tiny.report.html",)
stable_lock = helpers.stable_lock

# a temp file of fsutil.atomic_write (".NAME.tmp-PID-HEX") or a stage scratch folder (".tmp-work-...")
TEMP_RE = re.compile(r"^\.(.+\.tmp-\d+-[0-9a-f]+|tmp-work-.*)$")
START_RE = re.compile(r"^==> (\S+): running")
END_RE = re.compile(r"^    (\S+): (done in|FAILED in)")


def count(key: str, n: int = 1) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + n


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_CLI_LOCK = threading.Lock()  # CliRunner swaps sys.stdout/stderr: one in-process command at a time


def cli(*args: str) -> tuple[int, str, str]:
    """The real click entry point, in this process (fast): (exit code, stdout, stderr)."""
    from reidbuild.cli import main

    with _CLI_LOCK:
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("REIDBUILD_DEBUG", None)
    env.update(extra)
    return env


def run_cli(*args: str, env: Optional[dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m reidbuild.cli ARGS`` in a real subprocess."""
    return subprocess.run([sys.executable, "-m", "reidbuild.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or child_env(), timeout=timeout, cwd=REPO)


def assert_one_line_error(code: int, err: str, expected_code: int, needle: str = "") -> str:
    """Exit code as expected, no traceback, exactly one ``error:`` line (the last one); returns it."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == expected_code, f"exit {code}, expected {expected_code}: {err[-2000:]}"
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    assert lines and lines[-1].startswith("error: "), err[-2000:]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, err[-2000:]
    assert needle.lower() in lines[-1].lower(), f"{needle!r} not in {lines[-1]!r}"
    return lines[-1]


def temp_files(*folders: Path) -> list[Path]:
    out: list[Path] = []
    for f in folders:
        if f.is_dir():
            out.extend(p for p in f.iterdir() if TEMP_RE.match(p.name))
    return out


def copy_project(src: Path, dst: Path) -> Path:
    """A full, independent copy (real files, not links: tests flip bytes in place)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst / "m.yml"


def snapshot(root: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, tuple]:
    """Every entry under ``root`` (not following links): path -> (kind, size, sha256 or link target, mode)."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip(p):
                continue
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                snap[rel] = ("link", 0, os.readlink(p), st.st_mode)
            elif p.is_dir():
                snap[rel] = ("dir", 0, "", st.st_mode)
            else:
                snap[rel] = ("file", st.st_size, sha(p), st.st_mode)
        dirnames[:] = [d for d in dirnames if not skip(Path(dirpath) / d) and not (Path(dirpath) / d).is_symlink()]
    return snap


@dataclass
class Child:
    """``reidbuild apply`` (or any CLI command) in a real subprocess, with its stderr lines time-stamped."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=child_env)
    lines: list[tuple[float, str]] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cv = threading.Condition()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env, cwd=REPO, start_new_session=True)
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stderr, True), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stdout, False), daemon=True)]
        for t in self._threads:
            t.start()

    @classmethod
    def apply(cls, manifest: Path, *args: str, env: Optional[dict[str, str]] = None) -> "Child":
        return cls([sys.executable, "-m", "reidbuild.cli", "apply", *args, str(manifest)], env or child_env())

    def _pump(self, stream, is_err: bool) -> None:
        for line in stream:
            with self.cv:
                if is_err:
                    self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))
                else:
                    self.stdout.append(line)
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait_line(self, pred: Callable[[str], bool], timeout: float = 120) -> Optional[str]:
        """The first stderr line satisfying ``pred`` (None if the process ended first)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cv:
            while True:
                for _, ln in self.lines[seen:]:
                    if pred(ln):
                        return ln
                seen = len(self.lines)
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads[:1]):
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching line within {timeout} s; got {self.err()[-1500:]}")
                self.cv.wait(min(left, 0.05))

    def kill9(self) -> bool:
        """SIGKILL; True if the process was still alive (a real crash), False if it had already exited."""
        alive = self.proc.poll() is None
        if alive:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.join()
        return alive and self.proc.returncode == -signal.SIGKILL

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def finish(self, timeout: float = 180) -> int:
        self.proc.wait(timeout)
        self.join()
        return self.proc.returncode

    def join(self) -> None:
        for t in self._threads:
            t.join(10)

    def err(self) -> str:
        return "\n".join(ln for _, ln in self.lines)

    def out(self) -> str:
        return "".join(self.stdout)

    def hit(self) -> str:
        """Where the process was when it died: 'startup', a running stage, or 'after <stage>'."""
        running: Optional[str] = None
        last_done: Optional[str] = None
        for _, ln in self.lines:
            m = START_RE.match(ln)
            if m:
                running = m.group(1)
                continue
            m = END_RE.match(ln)
            if m and m.group(1) == running:
                last_done, running = running, None
        if running:
            return running
        return f"after {last_done}" if last_done else "startup"
