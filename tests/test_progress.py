"""Progress on long work: a bar with counts on a terminal (a real pseudo-terminal here), plain lines in logs,
nothing with --quiet, and --json stdout that stays machine-readable."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys

import pytest
from click.testing import CliRunner

from reidbuild.cli import main
from tests.helpers import REPO, tiny_manifest

BAR = "onnxruntime images  ["  # click's bar: label, two spaces, [###---], count


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    m = tiny_manifest(root)
    r = CliRunner().invoke(main, ["apply", str(m)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return root, m


def in_pty(*args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe); returns (exit code, stdout, terminal text)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "reidbuild.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        assert ready, "no output for 300 s"
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=300)
    os.close(master)
    return proc.returncode, out.decode(), seen.decode(errors="replace")


def test_a_terminal_gets_progress_bars_with_counts(project):
    _root, m = project
    code, out, tty = in_pty("apply", "--force", str(m))
    assert code == 0, tty
    assert BAR in tty and "5/5" in tty and "#" in tty
    assert "\r" in tty  # the bar is redrawn in place, not printed line by line
    assert "ran 5 stage(s)" in out


def test_json_stdout_parses_and_carries_no_bar(project):
    _root, m = project
    code, out, tty = in_pty("apply", "--force", "--json", str(m))
    assert code == 0, tty
    doc = json.loads(out)  # nothing but the JSON document on stdout
    assert "parity.onnxruntime" in doc["ran"]
    assert all(e["kind"] != "progress" for e in doc["events"])
    assert BAR not in tty and "[#" not in tty
    assert "onnxruntime images 5/5" in tty  # plain progress lines on stderr


def test_quiet_silences_progress(project):
    _root, m = project
    code, out, tty = in_pty("apply", "--force", "--quiet", str(m))
    assert code == 0
    assert "images" not in tty and "==>" not in tty
    assert "ran 5 stage(s)" in out


def test_logs_get_plain_progress_lines(project, tmp_path):
    root, m = project
    r = CliRunner().invoke(main, ["apply", "--force", str(m)], catch_exceptions=False)
    assert r.exit_code == 0
    assert "    parity.onnxruntime: onnxruntime images 5/5" in r.stderr.splitlines()
    assert "\r" not in r.stderr
    r = CliRunner().invoke(main, ["infer", str(m), "--backend", "onnxruntime", "--input", str(root / "imgs" / "*.png"),
                                  "--output", str(tmp_path / "f"), "--batch-size", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert "    infer: onnxruntime images 5/5" in r.stderr.splitlines()
    assert len(list((tmp_path / "f").glob("*.npy"))) == 5


def test_the_bar_shows_an_eta_once_it_can_estimate_one(monkeypatch):
    """A long loop (here 1.1 s per step) shows count and ETA; click estimates after a second of work."""
    import time

    from reidbuild.console import Progress

    master, slave = pty.openpty()
    term = os.fdopen(slave, "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", term)
    progress = Progress.for_stderr(quiet=False, as_json=False)
    assert progress.mode == "bar"
    progress.update("tensorrt.engine", "engine build: Building engine", 0, 10)
    for step in (1, 2):
        time.sleep(1.1)
        progress.update("tensorrt.engine", "engine build: Building engine", step, 10)
    progress.finish()
    term.flush()
    text = b""
    while select.select([master], [], [], 0.5)[0]:
        text += os.read(master, 65536)
    term.close()
    os.close(master)
    line = text.decode(errors="replace").split("\r")[-2]  # the last redraw before the bar finished
    assert "engine build: Building engine  [####" in line and "2/10" in line
    assert re.search(r"2/10  \d\d:\d\d:\d\d", line), line  # count, then click's ETA (hh:mm:ss)


def test_tensorrt_build_phases_reach_the_progress_callback():
    """TensorRT (>= 10) reports build phases through an IProgressMonitor subclass; this stand-in base class
    calls it the way TensorRT does (nested phases are not forwarded: one bar per top-level phase)."""
    from types import SimpleNamespace

    from reidbuild.tensorrt.build import progress_monitor

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    seen: list[tuple[str, int, int]] = []
    mon = progress_monitor(SimpleNamespace(IProgressMonitor=IProgressMonitor), lambda *a: seen.append(a))
    mon.phase_start("Building engine", None, 3)
    mon.phase_start("Tactic timing", "Building engine", 50)
    assert mon.step_complete("Tactic timing", 0) is True
    for step in range(3):
        assert mon.step_complete("Building engine", step) is True
    mon.phase_finish("Building engine")
    assert seen == [("Building engine", 0, 3), ("Building engine", 1, 3), ("Building engine", 2, 3),
                    ("Building engine", 3, 3)]
    assert progress_monitor(SimpleNamespace(), lambda *a: None) is None  # TensorRT < 10: no monitor
