"""A persistent stat cache: (path, device, inode, size, mtime_ns, ctime_ns) -> sha256, kept in the output folder.

A no-op ``apply`` used to re-hash every input and artifact (hundreds of MB for an R50) to learn that nothing
changed. Like git's index, this file remembers each file's hash together with its stat fields; while they are
unchanged, ``apply`` and ``plan`` trust the remembered hash. ``verify`` and ``apply --locked`` never read it:
they are the tamper checks and always re-hash (a file rewritten with the same size and a restored mtime fools
a stat cache, not them).

Racy entries (a file modified again within the file system's timestamp granularity of being hashed) are
never trusted: a hashed entry counts only when the file's mtime is older than the moment it was hashed by more
than the timestamp granularity, as git does for its index; such an entry is re-hashed once. An artifact this
process wrote is recorded with the hash of the bytes it wrote and the stat taken after its atomic rename. The
file is a cache: when it is missing, corrupt, a symlink or from another version it is ignored, and it is
rewritten atomically.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from .fsutil import HashCache, atomic_write, sha256_file

STATE_NAME = ".reidbuild-hashes.json"
_VERSION = 1
_FINE_MARGIN_NS = 100_000_000  # 0.1 s: Linux file systems stamp with the kernel's coarse clock (a few ms)
_COARSE_MARGIN_NS = 2_000_000_000  # 2 s: FAT and others store whole (even) seconds


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _racy(mtime_ns: int, hashed_at_ns: int) -> bool:
    """True when a later write could have kept the same mtime (it falls inside one timestamp tick)."""
    margin = _COARSE_MARGIN_NS if mtime_ns % 1_000_000 == 0 else _FINE_MARGIN_NS
    return mtime_ns + margin >= hashed_at_ns


class StatCache(HashCache):
    """``HashCache`` that remembers hashes across runs in ``folder/.reidbuild-hashes.json``."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self._entries: dict[str, list[Any]] = _read(folder / STATE_NAME)
        self._dirty = False

    def file(self, path: Path) -> str:
        """sha256 of ``path``: the remembered one while its stat fields match and the entry is not racy."""
        key = str(Path(path).absolute())
        st = os.stat(key)
        entry = self._entries.get(key)
        if (entry is not None and entry[:5] == _stat_key(st)
                and (entry[6] == 1 or not _racy(st.st_mtime_ns, entry[5]))):
            return str(entry[7])
        hashed_at = time.time_ns()
        digest = sha256_file(Path(key))
        self._remember(key, os.stat(key), hashed_at, digest, st, written=False)
        return digest

    def record(self, path: Path, digest: str) -> None:
        """Remember the hash of bytes this process just wrote to ``path`` (no need to read them back)."""
        key = str(Path(path).absolute())
        st = os.stat(key)
        self._remember(key, st, time.time_ns(), digest, st, written=True)

    def _remember(self, key: str, st: os.stat_result, hashed_at: int, digest: str,
                  before: os.stat_result, written: bool) -> None:
        if _stat_key(st) != _stat_key(before):  # changed while being hashed: remember nothing
            self._entries.pop(key, None)
        else:
            self._entries[key] = _stat_key(st) + [hashed_at, int(written), digest]
        self._dirty = True

    def save(self) -> None:
        """Write the cache atomically (only entries whose file still exists); no-op when nothing changed."""
        if not self._dirty or not self.folder.is_dir():
            return
        live = {k: v for k, v in sorted(self._entries.items()) if os.path.isfile(k)}
        text = json.dumps({"version": _VERSION, "entries": live}, separators=(",", ":"))
        try:
            atomic_write(self.folder, STATE_NAME, text.encode())
        except OSError:
            pass  # a cache that cannot be written costs time on the next run, never correctness
        self._dirty = False


def _read(path: Path) -> dict[str, list[Any]]:
    """The remembered entries; anything unexpected (absent, a link, corrupt, another version) reads as empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(64 << 20))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return {k: v for k, v in data["entries"].items() if _valid(v)}


def _valid(entry: object) -> bool:
    return (isinstance(entry, list) and len(entry) == 8 and all(type(x) is int for x in entry[:7])
            and isinstance(entry[7], str) and len(entry[7]) == 64)


def open_cache(folder: Optional[Path], trust: bool) -> HashCache:
    """The hash cache for one run: persistent in ``folder`` when ``trust``, else a per-run memo that re-hashes."""
    if trust and folder is not None:
        return StatCache(folder)
    return HashCache()
