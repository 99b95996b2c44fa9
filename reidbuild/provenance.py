"""Where the bytes in an output folder came from: ``<output_dir>/.reidbuild-run.json``.

The lock says *what* was built (fingerprints, artifact hashes, tool versions) and is the same on every machine
that builds the same thing, so a clone restored from the shared cache has a lock byte-identical to the
builder's and ``git diff`` shows nothing. *How* this folder got its bytes (built here, built on a Ray node, or
restored from which cache entry) differs per machine and per run, so it lives in this run record next to the
stat cache, never committed. Per stage it names the origin of the artifacts now in the folder: a stage that is
up to date keeps the origin recorded when its bytes were written, as long as the lock still names the same
hashes; otherwise its origin is ``unknown``. The file is informational: a missing or damaged one is rewritten.
"""
from __future__ import annotations

import datetime as dt
import json
import socket
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit, urlunsplit

from . import lockfile
from .fsutil import atomic_write

RUN_RECORD = ".reidbuild-run.json"
_VERSION = 1
BUILT, RESTORED, UNKNOWN = "built", "restored", "unknown"


class OriginTracker:
    """Wraps a pipeline event callback and notes, per stage, whether this run built or restored it."""

    def __init__(self, emit: Callable[[Any], None]) -> None:
        self.emit = emit
        self.origins: dict[str, str] = {}
        self.at: dict[str, str] = {}

    def __call__(self, ev: Any) -> None:
        kind = {"restored": RESTORED, "done": BUILT, "fail": BUILT}.get(ev.kind)
        if kind is not None:
            self.origins[ev.stage] = kind
            self.at[ev.stage] = _now()
        self.emit(ev)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def public_url(url: Optional[str]) -> Optional[str]:
    """The cache URL without any ``user:password@`` part (a run record must never hold a secret)."""
    if not url:
        return None
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _hashes(rec: lockfile.StageRecord) -> dict[str, str]:
    return {f: str(e.get("sha256")) for f, e in sorted(rec.outputs.items())}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("stages"), dict):
        return {}
    return data


def write_run_record(output_dir: Path, lock_path: Path, tracker: OriginTracker, cache_url: Optional[str],
                     restored_from: dict[str, dict[str, Any]], placement: dict[str, str]) -> Optional[Path]:
    """Merge this run's origins into the folder's run record; returns its path (None: no lock to describe).

    ``restored_from``: stage -> the cache entry it came from (key, when it was pushed); ``placement``: stage ->
    the Ray node that built it."""
    lock = lockfile.read(lock_path)
    if lock is None or not output_dir.is_dir():
        return None
    path = output_dir / RUN_RECORD
    before = _read(path).get("stages", {})
    stages: dict[str, Any] = {}
    for name, rec in sorted(lock.stages.items()):
        if not rec.outputs:
            continue
        origin = tracker.origins.get(name)
        if origin is None:  # up to date: keep what was recorded when these bytes were written
            old = before.get(name)
            ok = isinstance(old, dict) and old.get("outputs") == _hashes(rec)
            stages[name] = old if ok else {"origin": UNKNOWN, "outputs": _hashes(rec)}
            continue
        entry: dict[str, Any] = {"origin": origin, "at": tracker.at[name], "outputs": _hashes(rec)}
        if origin == RESTORED:
            entry.update({"cache": public_url(cache_url), **restored_from.get(name, {})})
        elif name in placement:
            entry["ray_node"] = placement[name]
        else:
            entry["host"] = socket.gethostname()
        stages[name] = entry
    record = {"version": _VERSION, "lock": lock_path.name, "updated": _now(), "stages": stages}
    atomic_write(output_dir, RUN_RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return path


def origins(output_dir: Path) -> dict[str, str]:
    """Stage -> origin of its artifacts as the run record says (empty when there is none)."""
    return {k: str(v.get("origin", UNKNOWN)) for k, v in _read(output_dir / RUN_RECORD).get("stages", {}).items()
            if isinstance(v, dict)}
