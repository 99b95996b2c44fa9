"""Filesystem safety: atomic writes that never follow symlinks, content hashing, and an exclusive run lock."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import Busy, InputError

_CHUNK = 1 << 20



def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HashCache:
    """Hash each file once per run (keyed by path, size and mtime), since big checkpoints are read often."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}

    def file(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = sha256_file(path)
        return self._cache[key]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(folder: Path, name: str, data: bytes,
                 before_replace: Callable[[], None] | None = None) -> Path:
    """Write ``folder/name`` via a fresh temp file (O_EXCL|O_NOFOLLOW), fsync, rename, fsync the folder.

    A reader sees the old file or the new one, never a partial one; a symlink planted at ``name`` is
    replaced, never followed, so nothing is written outside ``folder``. ``before_replace`` runs between the
    temp file's fsync and its rename (a named commit point for crash tests).
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")
    tmp = folder / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, folder / name)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)
    return folder / name


def clean_temp_files(folder: Path) -> None:
    """Remove temp files (``.NAME.tmp-PID-XXXX``) and stage scratch folders (``.tmp-work-PID-XXXX``) left
    by a killed run (whose PID is gone). Symlinks are never followed or removed."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        pid = temp_owner(p.name)
        if pid is None or p.is_symlink():
            continue
        if pid == os.getpid() or not _alive(pid):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def temp_owner(name: str) -> int | None:
    """The PID in a temp name written by ``atomic_write`` or ``StageContext.tempdir``; None otherwise."""
    if not name.startswith(".") or ".tmp-" not in name:
        return None
    rest = name[len(".tmp-work-"):] if name.startswith(".tmp-work-") else name.rsplit(".tmp-", 1)[1]
    try:
        return int(rest.split("-")[0])
    except ValueError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_dir(path: Path) -> Path:
    """Create the output folder (and parents); refuse when something that is not a folder is in the way."""
    if path.is_symlink() and not path.is_dir():
        raise InputError(f"{path}: output_dir is a dangling symlink")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{path}: output_dir exists and is not a folder") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot create output_dir: {exc.strerror}") from None
    return path


@contextmanager
def run_lock(folder: Path, wait: bool, on_wait: Callable[[str], None] | None = None,
             timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive flock on ``folder/.reidbuild.pid`` for one run.

    The kernel drops a flock when its process dies, so a lock left by a killed run never blocks.
    With ``wait`` False a second run fails fast (Busy, exit 4); otherwise it waits with a message.
    """
    lock = folder / ".reidbuild.pid"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{lock}: the run lock is a symbolic link; reidbuild does not follow links in "
                             "the output folder - remove it") from None
        raise InputError(f"{lock}: cannot open the run lock: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            if not wait:
                raise Busy(f"{folder}: another reidbuild run (pid {holder}) is using this output folder; "
                           "retry later or pass --wait") from None
            if on_wait:
                on_wait(f"waiting for another reidbuild run (pid {holder}) on {folder} ...")
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise Busy(f"{folder}: gave up waiting for reidbuild run (pid {holder})") from None
                    time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
