"""How the ``reidbuild`` command's process starts and ends: transparent huge pages for its heap, and an exit
that skips the interpreter's teardown.

A full build allocates and frees several GB of short-lived buffers (model copies, serialised graphs,
activations). On 4 KiB pages each fresh buffer costs one page fault per 4 KiB: an R50 apply took about 1.2
million faults and 3.3 s of system time, a third of its wall time on 2 cores. glibc (2.35 and newer) can ask
the kernel for 2 MiB pages for its heap (the ``glibc.malloc.hugetlb=1`` tunable); that cuts faults by 4x and
the build by about 0.9 s. The tunable is read only when the process starts, so a command that builds
re-executes itself once with it set, before it has read anything. Set ``REIDBUILD_HUGEPAGES=0`` to opt out.

At exit, unloading PyTorch, onnxruntime and pycaffe and freeing the model's objects one by one took 0.7-0.8
s after the build was finished and written. The command flushes its output, runs the ``atexit`` handlers
(logging, multiprocessing, Ray), and then ends the process directly.
"""
from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

OPT_OUT = "REIDBUILD_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# the subcommands that build or run models; the others are quick and are not worth an exec
HEAVY_COMMANDS = frozenset({"apply", "verify", "infer"})


def glibc_version() -> Optional[tuple[int, int]]:
    """glibc's (major, minor), or None on another C library (musl, macOS)."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError, AttributeError):
        return None


def _thp_on_request() -> bool:
    """True when the kernel gives huge pages to memory that asks for them (mode ``madvise``); with ``always``
    every heap gets them anyway, with ``never`` none does."""
    try:
        return "[madvise]" in THP_MODE.read_text()
    except OSError:
        return False


def wants_hugepages(argv: Sequence[str], environ: dict[str, str]) -> bool:
    """Whether this command line should re-execute with the huge-page tunable (see the module docstring)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in HEAVY_COMMANDS or environ.get(OPT_OUT, "1") == "0":
        return False
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False  # already set (by us, or by the user to another value)
    version = glibc_version()
    return version is not None and version >= (2, 35) and _thp_on_request()


def reexec_with_hugepages(argv: Sequence[str]) -> None:
    """Re-execute this process with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES`` when it helps;
    returns only when it does not (or when the exec is refused, which changes nothing but speed)."""
    if not wants_hugepages(argv, dict(os.environ)):
        return
    orig = getattr(sys, "orig_argv", None)
    if not orig or not sys.executable:
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(orig), env)
    except OSError:
        return


def exit_now(code: object) -> None:
    """End the process with ``code`` (a ``SystemExit`` code) after flushing output and running the ``atexit``
    handlers, without the interpreter's teardown."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the interpreter prints it and exits 1
        print(code, file=sys.stderr)
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status & 0xFF)
