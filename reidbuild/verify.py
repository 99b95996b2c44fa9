"""verify: re-hash what the lock names (artifacts, inputs, manifest, tool versions) and report differences."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import lockfile
from .errors import CheckFailed, ReidbuildError
from .fsutil import HashCache
from .manifest import LoadedManifest
from .pipeline import Planner, tool_versions


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"MISMATCH {p}" for p in self.problems] + [f"note: {n}" for n in self.notes]

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "problems": self.problems, "notes": self.notes, "ok": not self.problems}


def _engine_env_problem(rec: lockfile.StageRecord) -> str | None:
    try:
        from .tensorrt.env import engine_env_mismatch
    except ImportError:  # pragma: no cover - the module ships with reidbuild
        return None
    return engine_env_mismatch(rec.record.get("environment") or {})


def verify_lock(lm: LoadedManifest) -> VerifyReport:
    lock = lockfile.read(lm.lock_path)
    if lock is None:
        raise CheckFailed(f"{lm.lock_path}: no lock file; run `reidbuild apply {lm.path.name}` first")
    rep = VerifyReport()
    hashes = HashCache()
    if lock.manifest.get("sha256") != lm.sha256:
        rep.problems.append(f"manifest {lm.path.name} changed since the lock was written (run apply)")
    out_dir = lm.output_dir
    for sname, rec in sorted(lock.stages.items()):
        if rec.status == "skipped":
            rep.notes.append(f"stage {sname} was skipped: {rec.record.get('reason', '')}")
            continue
        if rec.status != "ok":
            rep.problems.append(f"stage {sname} is recorded as {rec.status}")
        now = tool_versions(tuple(rec.tools))
        for tool, version in sorted(rec.tools.items()):
            if now.get(tool) != version:
                rep.problems.append(f"stage {sname}: {tool} is {now.get(tool)} here, the lock was built with {version}")
        for role, entry in sorted(rec.inputs.items()):
            path = (lm.base / entry["path"]).resolve()
            rep.checked += 1
            if not path.is_file():
                rep.problems.append(f"stage {sname}: input {role} {entry['path']} is missing")
            elif hashes.file(path) != entry["sha256"]:
                rep.problems.append(f"stage {sname}: input {role} {entry['path']} changed (sha256 differs)")
        for fname, entry in sorted(rec.outputs.items()):
            path = out_dir / fname
            rep.checked += 1
            if path.is_symlink() or not path.is_file():
                rep.problems.append(f"artifact {fname} is missing")
                continue
            if hashes.file(path) == entry["sha256"]:
                continue
            if entry.get("reproducible") is False:
                env = _engine_env_problem(rec)
                rep.problems.append(f"artifact {fname} differs from the lock" +
                                    (f": {env}" if env else " (built on this same TensorRT/GPU: a real change)"))
            else:
                rep.problems.append(f"artifact {fname} differs from the lock (sha256 mismatch)")
    rep.problems.extend(_plan_problems(lm, lock, hashes))
    return rep


def _plan_problems(lm: LoadedManifest, lock: lockfile.Lock, hashes: HashCache) -> list[str]:
    """The lock must describe one complete, consistent build of this manifest, not just matching files.

    An interrupted apply commits stage by stage: its lock can lack later stages, or pair a new upstream
    artifact with a downstream record built from the old one. Every file still matches its own entry then,
    so recompute each stage's fingerprint from the lock's upstream hashes, as ``plan`` does.
    """
    from .stages.assemble import assemble

    try:
        plans = Planner(assemble(lm).stages, lock, lm.output_dir, lm.base, hashes).plan()
    except ReidbuildError as exc:
        return [f"cannot plan the build to check that the lock is complete: {exc.message.splitlines()[0]}"]
    problems = [f"stage {name} is in the lock but this manifest no longer builds it; run apply"
                for name in sorted(set(lock.stages) - {p.stage.name for p in plans})]
    for p in plans:
        rec = lock.stages.get(p.stage.name)
        if rec is None:
            problems.append(f"stage {p.stage.name} is not in the lock (never built, or an apply was "
                            "interrupted); run apply")
        elif (rec.status == "ok" and p.fingerprint is not None and p.fingerprint != rec.fingerprint
              and tool_versions(tuple(rec.tools)) == rec.tools):  # a tool change is reported above
            problems.append(f"stage {p.stage.name} is out of date: the lock records it built from other "
                            "inputs or upstream artifacts (an interrupted apply?); run apply")
    return problems
