"""The fsspec-backed store: action keys, restore (sha256-checked), push (blobs first, entry last), gc, ls.

Anything the storage library raises while talking to the cache means "unreachable": a warning and a
local build, or ``Unavailable`` (exit 3) when the cache is required. A blob whose bytes do not match its
name is never used: the stage is built locally and the problem is reported.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .. import lockfile
from ..errors import InputError, Unavailable
from ..fsutil import sha256_bytes
from ..pipeline import Event, Stage, StageResult

ENTRY_VERSION = 1
Emit = Callable[[Event], None]


@dataclass
class EntryInfo:
    """One action entry as ``cache ls`` shows it."""

    key: str
    stage: str
    files: dict[str, dict[str, Any]]
    modified: _dt.datetime

    @property
    def size(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files.values())


def _storage_options(url: str) -> dict[str, Any]:
    """Short timeouts for S3 so a cache that went away costs seconds, not minutes; credentials and the
    endpoint come from the usual places boto reads (environment, ~/.aws profiles, instance roles)."""
    if url.startswith(("s3://", "s3a://")):
        return {"config_kwargs": {"connect_timeout": 3, "read_timeout": 30, "retries": {"max_attempts": 2}},
                "skip_instance_cache": True}
    return {"skip_instance_cache": True}


def open_store(url: str, *, required: bool = False, push: bool = True,
               why_required: str = "--cache-required was given") -> "Store":
    """A store for ``url``; an unknown scheme or a missing storage library is an InputError (exit 2).

    ``required``: a cache that cannot be reached raises Unavailable (exit 3, ending with ``why_required``)
    instead of a warning and a local build."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url, **_storage_options(url))
    except (ImportError, ValueError) as exc:
        raise InputError(f"--cache {url}: cannot open this cache URL: {exc}") from None
    store = Store(url, fs, root.rstrip("/"), required=required, push=push)
    store.why_required = why_required
    return store


class Store:
    """The shared cache behind one URL (see the package docstring for the layout)."""

    def __init__(self, url: str, fs: Any, root: str, *, required: bool = False, push: bool = True) -> None:
        self.url = url
        self.fs = fs
        self.root = root
        self.required = required
        self.push_enabled = push
        self.down: Optional[str] = None  # why the cache was given up on for this run
        self.problems: list[str] = []  # what went wrong, for the run's summary
        self._bad_blobs: set[str] = set()
        # stage -> the entry it was restored from in this run (key, when it was pushed), for the run record
        self.restored_from: dict[str, dict[str, Any]] = {}
        self.why_required = "--cache-required was given"
        self._local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    # ---------------------------------------------------------------------------------------- layout

    def blob_path(self, digest: str) -> str:
        return f"{self.root}/blobs/{digest[:2]}/{digest}"

    def entry_path(self, key: str) -> str:
        return f"{self.root}/actions/{key[:2]}/{key}.json"

    # ------------------------------------------------------------------------------------ reachability

    def _unreachable(self, what: str, exc: BaseException, emit: Optional[Emit]) -> None:
        """Give up on the cache for this run (warn once), or raise when it is required."""
        why = f"cache {self.url} unreachable ({what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if self.required:
            raise Unavailable(f"{why}; {self.why_required}") from None
        if self.down is None:
            self.down = why
            self.problems.append(why)
            if emit is not None:
                emit(Event("warn", "cache", f"{why}: building locally"))

    def _call(self, what: str, fn: Callable[[], Any], emit: Optional[Emit]) -> Any:
        """``fn()`` unless the cache is down; a FileNotFoundError is an answer (absent), anything else the
        storage library raises means the cache cannot be reached (the library's error types vary by backend)."""
        if self.down is not None:
            return None
        try:
            return fn()
        except (FileNotFoundError, TypeError, AttributeError, NameError):
            raise  # an answer (absent), or a bug here, not an unreachable cache
        except Exception as exc:  # noqa: BLE001 - third-party storage errors have no common base
            self._unreachable(what, exc, emit)
            return None

    # ---------------------------------------------------------------------------------------------- keys

    def action_key(self, stage: Stage, fingerprint: str) -> Optional[str]:
        """The cache key of this stage's result; None when it cannot be shared (a non-reproducible stage
        whose environment cannot be read here: a TensorRT engine's raises without TensorRT or a GPU). The
        stage's own availability probe is not asked: it may import the tool (pycaffe for a Caffe parity
        check), which a restore does not need."""
        env: Optional[dict[str, Any]] = None
        if not stage.reproducible:
            if stage.environment is None:
                return None
            try:
                env = stage.environment()
            except Exception:  # noqa: BLE001 - a broken GPU setup just means: not cacheable here
                return None
        return lockfile.fingerprint({"entry": ENTRY_VERSION, "fingerprint": fingerprint, "environment": env})

    # ------------------------------------------------------------------------------------------ restore

    def read_entry(self, key: str, emit: Optional[Emit] = None) -> Optional[dict[str, Any]]:
        """The action entry for ``key``, or None (absent, unreadable, or the cache is down)."""
        try:
            raw = self._call("reading an action entry", lambda: self.fs.cat_file(self.entry_path(key)), emit)
        except FileNotFoundError:
            return None
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
            if not (isinstance(entry, dict) and entry.get("version") == ENTRY_VERSION
                    and isinstance(entry.get("outputs"), dict) and isinstance(entry.get("record"), dict)):
                raise ValueError("not a version-1 action entry")
            return entry
        except ValueError as exc:
            self._problem(f"cache entry {self.entry_path(key)} is damaged ({exc}); ignored", emit)
            return None

    def fetch_blobs(self, files: dict[str, str], what: str, emit: Optional[Emit]) -> Optional[dict[str, bytes]]:
        """The bytes of each ``file name -> sha256``, each checked; None if any is missing or corrupt."""
        out: dict[str, bytes] = {}
        for fname, digest in sorted(files.items()):
            try:
                data = self._call("downloading a blob", functools.partial(self.fs.cat_file, self.blob_path(digest)), emit)
            except FileNotFoundError:
                self._problem(f"cache: blob {digest[:12]} of {what}/{fname} is missing; building locally", emit)
                return None
            if data is None:
                return None
            if sha256_bytes(data) != digest:
                self._bad_blobs.add(digest)
                self._problem(f"cache: blob {digest[:12]} of {what}/{fname} is corrupt (its sha256 is "
                              f"{sha256_bytes(data)[:12]}); not used, building locally", emit)
                return None
            out[fname] = data
        return out

    def restore(self, stage: Stage, key: str, emit: Emit) -> Optional[StageResult]:
        """The stage's result from the cache (outputs sha256-checked in memory; the pipeline commits them
        atomically through temp names), or None to build locally."""
        entry = self.read_entry(key, emit)
        if entry is None or entry.get("status") != "ok":
            return None
        files = entry["outputs"]
        if sorted(files) != sorted(stage.outputs) or not all(
                isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in files.values()):
            self._problem(f"cache entry {key[:12]} for {stage.name} names other files than the stage makes; ignored",
                          emit)
            return None
        data = self.fetch_blobs({f: e["sha256"] for f, e in files.items()}, stage.name, emit)
        if data is None:
            return None
        built = entry.get("seconds")
        self.restored_from[stage.name] = {"key": key, "pushed": entry.get("pushed")}
        return StageResult(outputs=data, record=dict(entry["record"]),
                           sha256={f: e["sha256"] for f, e in files.items()},
                           seconds=float(built) if isinstance(built, (int, float)) and built >= 0 else None)

    def _problem(self, message: str, emit: Optional[Emit]) -> None:
        self.problems.append(message)
        if emit is not None:
            emit(Event("warn", "cache", message))

    # --------------------------------------------------------------------------------------------- push

    def _put(self, path: str, data: bytes) -> None:
        """Publish ``data`` at ``path`` whole: object stores do so per request; a folder via a temp name and a
        rename, so a concurrent reader never sees a partial file and concurrent writers of the same bytes
        simply replace each other."""
        if not self._local:
            self.fs.pipe_file(path, data)
            return
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.mv(tmp, path)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def push_blobs(self, outputs: dict[str, bytes], emit: Optional[Emit]) -> dict[str, str]:
        """Upload each output not already there (by name and size); returns file name -> sha256."""
        digests = {fname: sha256_bytes(data) for fname, data in outputs.items()}
        for fname, digest in sorted(digests.items()):
            path = self.blob_path(digest)
            size = len(outputs[fname])

            def upload(p: str = path, d: str = digest, n: str = fname, s: int = size) -> None:
                if d not in self._bad_blobs and self.fs.exists(p) and int(self.fs.info(p).get("size", -1)) == s:
                    return
                self._put(p, outputs[n])

            self._call("uploading a blob", upload, emit)
            if self.down is not None:
                break
        return digests

    def push(self, stage: Stage, key: str, result: StageResult, emit: Emit) -> None:
        """Blobs first, then the action entry (only for a successful stage), each published whole."""
        if not self.push_enabled or self.down is not None:
            return
        digests = self.push_blobs(result.outputs, emit)
        if self.down is not None or result.failed:
            return
        entry = {"version": ENTRY_VERSION, "stage": stage.name, "status": "ok",
                 "outputs": {f: {"sha256": d, "size": len(result.outputs[f])} for f, d in sorted(digests.items())},
                 "record": lockfile.plain(result.record),
                 "seconds": result.seconds,
                 "pushed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        text = json.dumps(entry, sort_keys=True, indent=1).encode()
        self._call("writing an action entry", lambda: self._put(self.entry_path(key), text), emit)

    # ------------------------------------------------------------------------------------- maintenance

    def _listing(self, sub: str) -> dict[str, dict[str, Any]]:
        try:
            return self._call("listing", lambda: self.fs.find(f"{self.root}/{sub}", detail=True), None) or {}
        except FileNotFoundError:
            return {}

    def entries(self) -> Iterator[EntryInfo]:
        """Every action entry (for ``cache ls`` and ``cache gc``, which open the store as required: a cache
        that cannot be read raises Unavailable)."""
        for path, info in sorted(self._listing("actions").items()):
            if not path.endswith(".json"):
                continue
            key = path.rsplit("/", 1)[1][:-5]
            entry = self.read_entry(key)
            if entry is None:
                continue
            yield EntryInfo(key, str(entry.get("stage", "?")), entry["outputs"], _modified(info))

    def gc(self, keep_days: float, now: Optional[_dt.datetime] = None,
           grace: _dt.timedelta = _dt.timedelta(hours=1)) -> tuple[int, int, int]:
        """Drop entries pushed more than ``keep_days`` ago, then blobs no remaining entry names (blobs younger
        than ``grace`` stay: a push may be uploading them before writing its entry).

        Returns (entries removed, blobs removed, bytes freed).
        """
        now = now or _dt.datetime.now(_dt.timezone.utc)
        cutoff = now - _dt.timedelta(days=keep_days)
        removed_entries, keep = 0, set[str]()
        for e in list(self.entries()):
            if e.modified < cutoff:
                self._call("removing an entry", functools.partial(self.fs.rm, self.entry_path(e.key)), None)
                removed_entries += 1
            else:
                keep.update(f["sha256"] for f in e.files.values() if isinstance(f, dict))
        removed_blobs = freed = 0
        for path, info in self._listing("blobs").items():
            name = path.rsplit("/", 1)[1]
            if name in keep or _modified(info) > now - grace:
                continue
            self._call("removing a blob", functools.partial(self.fs.rm, path), None)
            removed_blobs += 1
            freed += int(info.get("size") or 0)
        return removed_entries, removed_blobs, freed


def _modified(info: dict[str, Any]) -> _dt.datetime:
    """A listing entry's modification time, as local folders (``mtime``) and S3 (``LastModified``) give it."""
    value = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("created")
    if isinstance(value, _dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)
    if isinstance(value, (int, float)):
        return _dt.datetime.fromtimestamp(value, _dt.timezone.utc)
    if isinstance(value, str):
        return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return _dt.datetime.now(_dt.timezone.utc)
