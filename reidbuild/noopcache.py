"""A no-op ``apply`` in milliseconds: replay a recorded no-op while nothing it read has changed.

Even with the stat cache, a no-op ``apply`` spent most of its time starting Python, importing click, pydantic
and PyYAML and building the manifest's models. After an ``apply`` that ran no stage and exited 0, this module
writes a *no-op record* next to the lock (``.<manifest file name>.reidbuild-noop.json``, hidden, never
committed): the arguments, the working folder, the interpreter, ``sys.path``, the environment variables
reidbuild and its libraries read, whether stdout/stderr were terminals, the stat (device, inode, size,
mtime_ns, ctime_ns) of every file the run opened, imported or checked (the manifest, its config, patches,
images, model code, the lock, every artifact and the stat cache, reidbuild's own code and its libraries),
the names in every folder it listed, and the text it printed.

The next ``reidbuild apply M`` with the same arguments checks the record before importing click or pydantic:
when every field matches it prints the recorded text and exits 0; on any difference, or any trouble reading
the record, it takes the normal path. The files are found with ``sys.addaudithook`` (``open`` - which
``io.open_code`` fires for every import too -, ``os.listdir``, ``os.scandir``) while the normal path runs, so a
new kind of input is covered without a list to maintain.

Like the stat cache it trusts stat fields: a file rewritten in place with the same size, mtime and ctime
fools it. A file modified within the file system's timestamp granularity of being recorded (a racy entry, as
git calls it) is recorded with its sha256 and re-hashed on every fast path. ``verify`` and ``apply --locked``
never take the fast path: they re-hash everything. While another run holds the output folder's run lock the
fast path is not taken either (the normal path waits, or fails with ``--no-wait``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

RECORD_VERSION = 1
RECORD_SUFFIX = ".reidbuild-noop.json"
RUN_LOCK_NAME = ".reidbuild.pid"  # fsutil.run_lock's file (kept in step by tests/test_noop_fast.py)
DEBUG_ENV = "REIDBUILD_NOOP_DEBUG"  # set: the fast path says on stderr whether it was taken and why not
# options of `apply` that may come with a recorded no-op; anything else (--locked, --force, --json, --cache,
# several manifests, --jobs, --ray) always takes the normal path
FAST_OPTIONS = frozenset({"-q", "--quiet", "--wait", "--no-wait", "--skip-unavailable"})
# what the planner, the stages and the libraries it imports read from the environment
ENV_PREFIXES = ("REIDBUILD_", "PYTHON", "AWS_", "ORT_", "OMP_", "MKL_", "OPENBLAS_", "GLOG_", "CUDA", "LD_",
                "FSSPEC_", "NO_COLOR", "CLICK_")
ENV_NAMES = frozenset({"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "COLUMNS"})
SUMMARY = "nothing to do: all {n} stages up to date ({seconds:.1f} s)"
_SUMMARY_MARK = "\x00summary\x00"
_FINE_MARGIN_NS = 100_000_000  # as statcache: Linux stamps with a coarse clock (a few ms)
_COARSE_MARGIN_NS = 2_000_000_000  # FAT and others store whole (even) seconds
_MAX_RACY_BYTES = 16 << 20  # a racy file larger than this is not worth hashing on every fast path: no record
_SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.posix_spawn", "os.exec", "os.spawn", "os.fork",
                           "ctypes.dlopen"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def summary_line(n: int, seconds: float) -> str:
    """The line a no-op ``apply`` ends with (the CLI and the fast path print the same words)."""
    return SUMMARY.format(n=n, seconds=seconds)


def record_path(manifest: str) -> str:
    """Where the no-op record of ``manifest`` lives: a hidden file next to it and its lock."""
    folder, name = os.path.split(os.path.abspath(manifest))
    return os.path.join(folder, f".{name}{RECORD_SUFFIX}")


def fast_manifest(argv: list[str]) -> Optional[str]:
    """The manifest when ``argv`` (without the program) is a plain ``apply`` of one manifest file, else None."""
    if len(argv) < 2 or argv[0] != "apply":
        return None
    positional = [a for a in argv[1:] if not a.startswith("-")]
    if len(positional) != 1 or any(a.startswith("-") and a not in FAST_OPTIONS for a in argv[1:]):
        return None
    manifest = positional[0]
    if any(c in manifest for c in "*?[") or not os.path.isfile(manifest):
        return None
    return manifest


def _is_ours(name: str) -> bool:
    """Bookkeeping files that change on every run without changing what a build reads."""
    return name == RUN_LOCK_NAME or name.endswith(RECORD_SUFFIX) or ".tmp-" in name


def _environment() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def _interpreter() -> dict[str, Any]:
    """What decides which code runs and how output looks, compared as a whole."""
    return {"executable": sys.executable, "python": sys.version, "flags": list(sys.flags), "path": list(sys.path),
            "cwd": os.getcwd(),
            "tty": [sys.stdout.isatty(), sys.stderr.isatty()], "env": _environment()}


def _stat_key(path: str) -> Optional[list[int]]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _listing(path: str) -> Optional[list[str]]:
    try:
        return sorted(n for n in os.listdir(path) if not _is_ours(n))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _debug(message: str) -> None:
    if os.environ.get(DEBUG_ENV):
        sys.stderr.write(f"[noop] {message}\n")


# ---------------------------------------------------------------- the fast path


def _read_record(path: str) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        doc = json.loads(f.read())
    if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
        raise ValueError("another record version")
    return doc


def _mismatch(doc: dict[str, Any], argv: list[str]) -> Optional[str]:
    """Why the record does not describe this run (None: it does)."""
    if doc["argv"] != argv:
        return "other arguments"
    if doc["interpreter"] != _interpreter():
        return "another interpreter, folder, sys.path, terminal or environment"
    for path, key in doc["files"].items():
        if _stat_key(path) != (key[:5] if key is not None else None):
            return f"{path} changed"
        if key is not None and len(key) > 5 and _sha256(path) != key[5]:
            return f"{path} changed (same stat)"
    for path, names in doc["dirs"].items():
        if _listing(path) != names:
            return f"the files in {path} changed"
    return None


def _try_lock(output_dir: str) -> Optional[int]:
    """The run lock's descriptor, held; None when another run holds it or it is missing."""
    import fcntl

    try:
        fd = os.open(os.path.join(output_dir, RUN_LOCK_NAME), os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def replay(argv: list[str], started: float) -> bool:
    """Print the recorded no-op and return True when nothing the record names has changed; False otherwise
    (never raises: any trouble means the normal path)."""
    manifest = fast_manifest(argv)
    if manifest is None:
        return False
    fd: Optional[int] = None
    try:
        doc = _read_record(record_path(manifest))
        fd = _try_lock(doc["output_dir"])
        why = "the output folder's run lock is held" if fd is None else _mismatch(doc, argv)
        if why is not None:
            _debug(f"normal path: {why}")
            return False
        summary = summary_line(int(doc["stages"]), time.perf_counter() - started)
        sys.stderr.write(doc["stderr"])
        sys.stdout.write(doc["stdout"].replace(_SUMMARY_MARK, summary))
        sys.stdout.flush()
        _debug("fast path: replayed the recorded no-op")
        return True
    except Exception as exc:  # noqa: BLE001 - a record that cannot be used means the normal path, never an error
        _debug(f"normal path: no usable record ({type(exc).__name__}: {exc})")
        return False
    finally:
        if fd is not None:
            os.close(fd)


# ---------------------------------------------------------------- recording on the normal path


class _Tee:
    """A text stream that writes through to ``stream`` and keeps a copy of what went by."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        n = self.stream.write(text)  # first: click probes with bytes, which a text stream refuses
        self.parts.append(text)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class Watcher:
    """Notes, while the normal path runs, every file it opens and every folder it lists, and what it prints."""

    def __init__(self, argv: list[str], manifest: str) -> None:
        self.argv, self.manifest = argv, manifest
        self.interpreter = _interpreter()
        self.opened: set[str] = set()
        self.listed: set[str] = set()
        self.run_locks: set[str] = set()
        self.spawned: list[str] = []  # programs run (their versions are outside any record) or events not
        # understood: either means no record
        self.active = True
        self.out, self.err = _Tee(sys.stdout), _Tee(sys.stderr)

    def start(self) -> None:
        sys.addaudithook(self._hook)
        sys.stdout, sys.stderr = self.out, self.err

    def stop(self) -> None:
        self.active = False
        if sys.stdout is self.out:
            sys.stdout = self.out.stream
        if sys.stderr is self.err:
            sys.stderr = self.err.stream

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event in _SPAWN_EVENTS:
            self.spawned.append(event)
        if event not in ("open", "os.listdir", "os.scandir"):
            return
        try:
            self._note(event, args)
        except Exception:  # noqa: BLE001 - an audit hook's error would fail the run's own open: no record instead
            self.spawned.append(f"{event} (not understood)")

    def _note(self, event: str, args: tuple[Any, ...]) -> None:
        path = args[0] if args else "."
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return  # a descriptor (os.scandir(fd)): its folder was opened by name first
        path = os.path.abspath(path)
        if event != "open":
            self.listed.add(path)
        elif os.path.basename(path) == RUN_LOCK_NAME:
            self.run_locks.add(os.path.dirname(path))
        elif not _writes(args):
            self.opened.add(path)


def _writes(args: tuple[Any, ...]) -> bool:
    mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
    return (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(int(flags or 0) & _WRITE_FLAGS)


_watcher: Optional[Watcher] = None


def watch(argv: list[str]) -> None:
    """Start noting what this run reads, when ``argv`` is a plain ``apply`` the fast path could replay."""
    global _watcher
    manifest = fast_manifest(argv)
    if manifest is None or _watcher is not None:
        return
    try:
        watcher = Watcher(argv, manifest)
    except Exception:  # noqa: BLE001 - e.g. a working folder that no longer exists: the run goes on, unrecorded
        return
    _watcher = watcher
    watcher.start()


def forget(manifest: str) -> None:
    """Drop ``manifest``'s record before a normal ``apply`` builds anything (a crash leaves no stale record)."""
    try:
        os.unlink(record_path(manifest))
    except OSError:
        pass


def finish(noop: bool, stages: int, summary: str) -> None:
    """End of a single-manifest ``apply``: record it when it was a replayable no-op (``noop``: ran, restored,
    skipped and failed nothing, no ``--json``, no cache), else leave no record. Never raises."""
    global _watcher
    watcher, _watcher = _watcher, None
    if watcher is None:
        return
    watcher.stop()
    if not noop or len(watcher.run_locks) != 1 or watcher.spawned:
        _debug(f"no record (spawned: {watcher.spawned})" if watcher.spawned else "no record")
        return
    output_dir = next(iter(watcher.run_locks))
    fd = _try_lock(output_dir)
    if fd is None:
        return
    try:
        doc = _collect(watcher, output_dir, stages, summary)
        if doc is not None:
            from .fsutil import atomic_write

            folder, name = os.path.split(record_path(watcher.manifest))
            atomic_write(Path(folder), name, json.dumps(doc, separators=(",", ":")).encode())
    except Exception as exc:  # noqa: BLE001 - a record that cannot be written costs time next run, nothing else
        _debug(f"no record written ({type(exc).__name__}: {exc})")
    finally:
        os.close(fd)


def _collect(watcher: Watcher, output_dir: str, stages: int, summary: str) -> Optional[dict[str, Any]]:
    """The record's contents, or None when a file is racy and too large to re-hash on every fast path."""
    from .statcache import STATE_NAME

    files = set(watcher.opened) | _module_files() | _cached_paths(os.path.join(output_dir, STATE_NAME))
    files |= {os.path.join(output_dir, n) for n in os.listdir(output_dir) if not _is_ours(n)}
    files.add(os.path.splitext(os.path.abspath(watcher.manifest))[0] + ".lock")
    opened_dirs = {f for f in files if os.path.isdir(f)}  # a folder opened to fsync it, or listed by fd
    files -= opened_dirs
    dirs = watcher.listed | opened_dirs | {os.path.dirname(f) for f in files} | _import_dirs() | {output_dir}
    keys: dict[str, Optional[list[Any]]] = {}
    now = time.time_ns()
    for path in sorted(files):
        key: Optional[list[Any]] = _stat_key(path)
        if key is not None and _racy(key, now):
            if key[2] > _MAX_RACY_BYTES:
                _debug(f"no record: {path} changed a moment ago")
                return None
            digest = _sha256(path)
            if _stat_key(path) != key:
                return None
            key = key + [digest]
        keys[path] = key
    stdout = "".join(watcher.out.parts)
    if summary not in stdout:
        return None
    return {"version": RECORD_VERSION, "argv": watcher.argv, "interpreter": watcher.interpreter,
            "output_dir": output_dir, "stages": stages, "files": keys,
            "dirs": {d: _listing(d) for d in sorted(dirs)},
            "stdout": stdout.replace(summary, _SUMMARY_MARK, 1), "stderr": "".join(watcher.err.parts)}


def _racy(key: list[Any], now: int) -> bool:
    """True when a later write could keep every stat field (it falls inside one timestamp tick)."""
    newest = int(max(key[3], key[4]))
    margin = _COARSE_MARGIN_NS if key[3] % 1_000_000 == 0 else _FINE_MARGIN_NS
    return newest + margin >= now


def _module_files() -> set[str]:
    """The source of every module this process imported (reidbuild's own code, its libraries, fork code)."""
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            files.add(os.path.abspath(path))
    return files


def _import_dirs() -> set[str]:
    """Folders whose new files could change what an import finds (listed before the watcher started)."""
    dirs = {os.path.abspath(p or ".") for p in sys.path if os.path.isdir(p or ".")}
    for module in list(sys.modules.values()):
        dirs.update(os.path.abspath(p) for p in (getattr(module, "__path__", None) or []) if isinstance(p, str))
    return dirs


def _cached_paths(state: str) -> set[str]:
    """Every file the stat cache vouches for (inputs and artifacts a no-op checked by their stat)."""
    try:
        with open(state, "rb") as f:
            entries = json.loads(f.read()).get("entries", {})
    except (OSError, ValueError, AttributeError):
        return set()
    return {k for k in entries if isinstance(k, str)}
