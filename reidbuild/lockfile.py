"""The lock: a plain, sorted, diff-friendly YAML record of every input, stage fingerprint and artifact.

Written atomically beside the manifest (``<stem>.lock``); read back to decide what is stale and to verify.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from . import yamlio
from .errors import InputError
from .fsutil import atomic_write

LOCK_VERSION = 1
HEADER = "# reidbuild lock file: written by `reidbuild apply`; commit it next to the manifest.\n"


@dataclass
class StageRecord:
    """What one stage consumed and produced the last time it ran."""

    fingerprint: str
    status: str  # ok | failed | skipped | refused (the target format cannot express the model)
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)   # role -> {path, sha256, size}
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> {path, sha256, size, ...}
    record: dict[str, Any] = field(default_factory=dict)              # stage-specific facts (parity, exporter)
    tools: dict[str, str] = field(default_factory=dict)
    seconds: Optional[float] = None  # how long the stage ran when it was built (the report's timeline)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fingerprint": self.fingerprint, "status": self.status, "params": self.params,
               "inputs": self.inputs, "outputs": self.outputs, "record": self.record, "tools": self.tools}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out


@dataclass
class Lock:
    manifest: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)

    def to_text(self) -> str:
        body = {"version": LOCK_VERSION, "manifest": self.manifest,
                "stages": {k: v.to_dict() for k, v in self.stages.items()}}
        return HEADER + yaml.safe_dump(plain(body), sort_keys=True, default_flow_style=False, width=100)


def plain(obj: Any) -> Any:
    """Round-trip through JSON so only plain types (and stable float text) reach YAML."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a stage's parameters, input hashes, upstream hashes and tool versions."""
    text = json.dumps(plain(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read(path: Path) -> Lock | None:
    """The lock at ``path``, None if absent; a corrupt lock is an InputError naming the file."""
    if not path.exists():
        return None
    doc = yamlio.load(path, "lock file", fast=True)
    data = doc.data
    try:
        if not isinstance(data, dict) or data.get("version") != LOCK_VERSION:
            raise ValueError(f"expected a mapping with version: {LOCK_VERSION}")
        stages = {}
        for name, rec in (data.get("stages") or {}).items():
            _check_record(name, rec)
            stages[name] = StageRecord(
                fingerprint=str(rec["fingerprint"]), status=str(rec["status"]),
                params=dict(rec.get("params") or {}), inputs=dict(rec.get("inputs") or {}),
                outputs=dict(rec.get("outputs") or {}), record=dict(rec.get("record") or {}),
                tools=dict(rec.get("tools") or {}), seconds=_seconds(rec.get("seconds")))
        return Lock(manifest=dict(data.get("manifest") or {}), stages=stages)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: lock file is corrupt ({exc}); delete it to rebuild from scratch") from None


def _seconds(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"seconds must be a non-negative number, got {value!r}")
    return float(value)


def _check_record(name: str, rec: Any) -> None:
    """Refuse a hand-damaged stage entry here, so nothing downstream trips over it."""
    if not isinstance(rec, dict):
        raise ValueError(f"stage {name} is not a mapping")
    for section in ("inputs", "outputs"):
        for key, entry in (rec.get(section) or {}).items():
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("path"), str)):
                raise ValueError(f"stage {name}: {section}.{key} needs a path and a sha256")
    for tool, version in (rec.get("tools") or {}).items():
        if not isinstance(version, str):
            raise ValueError(f"stage {name}: tools.{tool} must be a version string")


def write(path: Path, lock: Lock, unchanged_from: Optional[Lock] = None,
          on_synced: Optional[Callable[[], None]] = None) -> None:
    """Write the lock atomically; an unchanged lock is left alone (a no-op apply writes nothing).

    ``unchanged_from``: the lock as read from ``path`` at the start of the run; when ``lock`` equals it, the
    file already holds these records and is not even serialised again (PyYAML's emitter is pure Python).
    ``on_synced`` is called once the complete temp file is fsynced, before it replaces the lock (a commit
    point crash tests stop at).
    """
    if unchanged_from is not None and lock == unchanged_from and path.is_file() and not path.is_symlink():
        return
    data = lock.to_text().encode()
    try:
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write(path.parent, path.name, data, before_replace=on_synced)


def iter_artifacts(lock: Lock) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(stage, file name, entry) for every artifact the lock names, in a stable order."""
    for sname, rec in sorted(lock.stages.items()):
        for fname, entry in sorted(rec.outputs.items()):
            yield sname, fname, entry
