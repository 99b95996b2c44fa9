"""The command's process start and end (reidbuild/launch.py): one re-exec with huge pages for the commands
that build, and an exit that keeps output and atexit handlers but skips the interpreter's teardown."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reidbuild import launch

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    full = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", launch.OPT_OUT)}
    full.update(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=full, timeout=60)


def _machine_has_it() -> bool:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", launch.OPT_OUT)}
    return launch.wants_hugepages(["apply", "m.yml"], env)


@pytest.mark.parametrize("argv, env, expected", [
    (["plan", "m.yml"], {}, False),                              # quick commands never pay for an exec
    (["validate", "m.yml"], {}, False),
    (["--version"], {}, False),
    (["apply", "m.yml"], {launch.OPT_OUT: "0"}, False),          # the documented opt-out
    (["apply", "m.yml"], {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, False),  # the user's own choice stays
    (["apply", "m.yml"], {"GLIBC_TUNABLES": launch.TUNABLE}, False),           # already re-executed: no loop
])
def test_commands_that_are_not_reexecuted(argv: list[str], env: dict[str, str], expected: bool) -> None:
    assert launch.wants_hugepages(argv, env) is expected


def test_glibc_version_is_read_from_the_c_library() -> None:
    version = launch.glibc_version()
    name = os.confstr("CS_GNU_LIBC_VERSION") or ""
    if name.startswith("glibc "):
        assert version is not None and version == tuple(int(x) for x in name.split()[1].split(".")[:2])
    else:
        assert version is None


@pytest.mark.skipif(not _machine_has_it(), reason="this machine's kernel gives no huge pages on request "
                                                  "(THP mode not 'madvise') or its C library is not glibc >= 2.35")
def test_a_build_command_reexecutes_once_with_the_tunable(tmp_path: Path) -> None:
    """The real exec: the script runs twice, the second time with the tunable, keeping its arguments; the second
    incarnation does not exec again."""
    r = _run("""
        import os, sys
        from reidbuild import launch
        print("run", sys.argv[1:], os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
        launch.reexec_with_hugepages(["apply", "m.yml"])
        print("went on", flush=True)
    """, tmp_path, env={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines == ["run [] glibc.malloc.arena_max=2",
                     f"run [] glibc.malloc.arena_max=2:{launch.TUNABLE}",
                     "went on"], r.stdout


def test_exit_now_keeps_output_and_atexit_handlers(tmp_path: Path) -> None:
    marker = tmp_path / "atexit-ran"
    r = _run(f"""
        import atexit, sys
        from pathlib import Path
        from reidbuild import launch
        atexit.register(lambda: Path({str(marker)!r}).write_text("yes"))
        sys.stdout.write("buffered output, not flushed yet")
        launch.exit_now(3)
        print("never printed")
    """, tmp_path)
    assert r.returncode == 3
    assert r.stdout == "buffered output, not flushed yet"
    assert marker.read_text() == "yes"


@pytest.mark.parametrize("code, status, stderr", [(None, 0, ""), (0, 0, ""), (4, 4, ""), ("a message", 1, "a message\n")])
def test_exit_now_follows_system_exit_codes(tmp_path: Path, code: object, status: int, stderr: str) -> None:
    r = _run(f"from reidbuild import launch\nlaunch.exit_now({code!r})\n", tmp_path)
    assert (r.returncode, r.stderr) == (status, stderr)


def test_the_command_exits_with_its_code_through_exit_now(tmp_path: Path) -> None:
    """`python -m reidbuild.cli` goes through ``entry``: an invalid manifest still gives exit 2 and its one-line
    error."""
    bad = tmp_path / "m.yml"
    bad.write_text("version: 1\nname: [\n")
    r = subprocess.run([sys.executable, "-m", "reidbuild.cli", "apply", str(bad)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and str(bad) in r.stderr and len(r.stderr.strip().splitlines()) == 1
