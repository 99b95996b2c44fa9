"""Plan and run: turn stages into a fingerprinted plan, run what is stale, commit artifacts and the lock.

Stages (``reidbuild/stages/*``) describe themselves as ``Stage`` values; this module knows nothing of
ONNX or Caffe. Data flows one way: manifest -> stages -> artifacts -> lock.
"""
from __future__ import annotations

import gc
import importlib.metadata
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, Protocol

from . import heap, lockfile
from .errors import CheckFailed, InputError, NotExpressible, ReidbuildError, StageFailed, Unavailable
from .fsutil import HashCache, atomic_write, clean_temp_files, ensure_dir, sha256_bytes
from .statcache import StatCache, open_cache

# ----------------------------------------------------------------------------------------------- types


@dataclass
class StageResult:
    """What a stage produced: artifact bytes by file name, and facts to record in the lock."""

    outputs: dict[str, bytes] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    failed: Optional[str] = None  # a check stage sets this: recorded as failed, apply exits 1
    sha256: dict[str, str] = field(default_factory=dict)  # outputs' hashes already checked (restored from cache)
    # how long the stage ran where it was built: a restore keeps the builder's figure, so a restored lock (and
    # the report that shows the timeline) is byte-identical to the builder's
    seconds: Optional[float] = None


@dataclass
class Stage:
    """One step of the build.

    ``params`` (JSON-able), the hashes of ``inputs`` (external files), the hashes of the outputs of
    ``deps`` and the versions of ``tools`` make its fingerprint; when that changes, it re-runs.
    """

    name: str
    run: Callable[["StageContext"], StageResult]
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Path] = field(default_factory=dict)
    deps: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    available: Optional[Callable[[], Optional[str]]] = None  # returns why it cannot run here, or None
    reproducible: bool = True  # False: bytes differ run to run (TensorRT engines); --locked checks env instead
    description: str = ""
    # a stage that reports on whatever upstream stages produced (the HTML report): a skipped dependency is
    # left out of its fingerprint instead of skipping it too
    partial_deps: bool = False
    # a non-reproducible stage's own test for ``verify --rebuild``: given the locked and the rebuilt output
    # folders, why their outputs are not equivalent, or None when they are
    equivalent: Optional[Callable[[Path, Path], Optional[str]]] = None
    # reads this run's lock records (``ctx.lock``, the report): runs in this process, never on a remote worker
    reads_lock: bool = False
    # for `plan --diff`: given the output folder, per change (what, readable before/after diff)
    diff: Optional[Callable[[Path], list[tuple[Path, str]]]] = None
    # non-reproducible stages: what the bytes are tied to here (GPU, TensorRT...); part of the shared-cache key
    environment: Optional[Callable[[], dict[str, Any]]] = None
    # what a node must offer to run it in a fleet build, e.g. {"gpu": "NVIDIA A10"} (not in the fingerprint)
    placement: dict[str, str] = field(default_factory=dict)


class StageContext:
    """What a running stage may touch: upstream artifacts, a per-run cache, and a progress logger."""

    def __init__(self, output_dir: Path, cache: dict[str, Any], log: Callable[[str], None],
                 inputs: Optional[dict[str, dict[str, Any]]] = None,
                 progress: Optional[Callable[[str, int, int], None]] = None,
                 lock: Optional[lockfile.Lock] = None, up_to_date: tuple[str, ...] = ()) -> None:
        self.output_dir = output_dir
        self.cache = cache
        self.log = log
        self.inputs = inputs or {}  # role -> {path, sha256, size}, already hashed by the planner
        # progress(what, done, total) on long loops; the CLI decides how (bar, line or nothing)
        self.progress = progress or (lambda what, done, total: None)
        self.lock = lock or lockfile.Lock()  # the records committed so far in this run (upstream stages)
        self.up_to_date = up_to_date  # stages found up to date in this run

    def artifact(self, name: str) -> Path:
        """Path of an already committed artifact (an upstream stage's output)."""
        return self.output_dir / name

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """Per-run memo, e.g. the PyTorch model or reference features shared by several stages."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def tempdir(self) -> Path:
        """A scratch folder inside the output folder, removed after the run (success or failure)."""
        if "_tmp" not in self.cache:
            import tempfile

            # the PID in the name lets the next run remove it if this one is killed
            self.cache["_tmp"] = Path(tempfile.mkdtemp(prefix=f".tmp-work-{os.getpid()}-", dir=self.output_dir))
        scratch: Path = self.cache["_tmp"]
        return scratch


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class StagePlan:
    """One stage evaluated against the lock: what ``plan`` shows and what ``run`` decides on."""

    stage: Stage
    fingerprint: Optional[str]  # None when an upstream stage must run first
    reasons: list[str]  # why it must run; empty: up to date
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {path, sha256, size}

    @property
    def stale(self) -> bool:
        return bool(self.reasons)


# set by ``run`` for its duration: each version lookup scans every sys.path folder (about 1 ms), and a run asks
# for the same few tools twice per stage; outside a run (verify, plan) every call looks them up afresh
_run_versions: Optional[dict[str, str]] = None


def tool_versions(names: tuple[str, ...]) -> dict[str, str]:
    memo = _run_versions if _run_versions is not None else {}
    out: dict[str, str] = {}
    for n in names:
        if n not in memo:
            memo[n] = _tool_version(n)
        out[n] = memo[n]
    return out


def _tool_version(name: str) -> str:
    if name == "python":
        return "%d.%d.%d" % sys.version_info[:3]
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def tool_drift(rec: "lockfile.StageRecord") -> str:
    """``'onnx 1.16.0 -> 1.17.0'`` for each tool whose version here differs from the one the lock records."""
    now = tool_versions(tuple(rec.tools))
    return ", ".join(f"{k} {v} -> {now[k]}" for k, v in sorted(rec.tools.items()) if now[k] != v)


def file_entry(path: Path, base: Path, hashes: HashCache) -> dict[str, Any]:
    try:
        digest = hashes.file(path)
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{path}: input file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: input is a folder, expected a file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read input: {exc.strerror}") from None
    return {"path": _rel(path, base), "sha256": digest, "size": size}


def _rel(path: Path, base: Path, follow: bool = True) -> str:
    path = Path(path).resolve() if follow else Path(path)
    try:
        return str(path.relative_to(base.resolve()))
    except ValueError:
        return os.path.relpath(path, base.resolve())


def stage_inputs(stage: Stage, base: Path, hashes: HashCache) -> dict[str, dict[str, Any]]:
    """Role -> {path, sha256, size} of the stage's external input files (what its context is given)."""
    return {role: file_entry(p, base, hashes) for role, p in sorted(stage.inputs.items())}


class Planner:
    """Computes fingerprints and stale reasons against a lock, stage by stage, in order."""

    def __init__(self, stages: list[Stage], lock: Optional[lockfile.Lock], output_dir: Path, base: Path,
                 hashes: HashCache) -> None:
        self.stages = stages
        self.lock = lock or lockfile.Lock()
        self.output_dir = output_dir
        self.base = base
        self.hashes = hashes
        names = [s.name for s in stages]
        for s in stages:
            for d in s.deps:
                if d not in names[: names.index(s.name)]:
                    raise ValueError(f"stage {s.name} depends on {d}, which does not run before it")

    def inputs_of(self, stage: Stage) -> dict[str, dict[str, Any]]:
        return stage_inputs(stage, self.base, self.hashes)

    def dep_hashes(self, stage: Stage, outputs: dict[str, dict[str, dict[str, Any]]]) -> Optional[dict[str, str]]:
        deps: dict[str, str] = {}
        for d in stage.deps:
            if d not in outputs:
                if stage.partial_deps:
                    continue
                return None
            for fname, entry in sorted(outputs[d].items()):
                deps[f"{d}/{fname}"] = entry["sha256"]
        return deps

    def fingerprint(self, stage: Stage, inputs: dict[str, dict[str, Any]], deps: dict[str, str]) -> str:
        return lockfile.fingerprint({
            "stage": stage.name, "params": stage.params,
            "inputs": {k: v["sha256"] for k, v in inputs.items()},
            "deps": deps, "tools": tool_versions(stage.tools)})

    def check(self, stage: Stage, fp: Optional[str], upstream_stale: list[str]) -> list[str]:
        """Why ``stage`` must run (empty: up to date)."""
        rec = self.lock.stages.get(stage.name)
        if rec is None:
            return ["never built (not in the lock)"]
        reasons: list[str] = []
        if rec.status != "ok":
            reasons.append(f"last run {rec.status}")
        if fp is None:
            reasons.append(f"upstream stage(s) {', '.join(upstream_stale)} will run first")
        elif fp != rec.fingerprint:
            reasons.extend(self._why_changed(stage, rec) or ["fingerprint changed"])
        elif tool_drift(rec):  # the fingerprint matches, but the lock says other tools built it
            reasons.append("tool versions changed: " + tool_drift(rec))
        for fname in stage.outputs:
            path = self.output_dir / fname
            entry = rec.outputs.get(fname)
            if entry is None:
                reasons.append(f"artifact {fname} not in the lock")
            elif not path.is_file() or path.is_symlink():
                reasons.append(f"artifact {fname} is missing")
            elif self.hashes.file(path) != entry.get("sha256"):
                reasons.append(f"artifact {fname} was modified")
        return reasons

    def _why_changed(self, stage: Stage, rec: lockfile.StageRecord) -> list[str]:
        out = []
        params = lockfile.plain(stage.params)
        changed = sorted(k for k in set(params) | set(rec.params) if params.get(k) != rec.params.get(k))
        if changed:
            out.append("parameters changed: " + ", ".join(changed))
        inputs = self.inputs_of(stage)
        changed_in = sorted(k for k in set(inputs) | set(rec.inputs)
                            if inputs.get(k, {}).get("sha256") != rec.inputs.get(k, {}).get("sha256"))
        if changed_in:
            out.append("inputs changed: " + ", ".join(changed_in))
        tools = tool_versions(stage.tools)
        changed_t = sorted(k for k in tools if rec.tools and tools[k] != rec.tools.get(k))
        if changed_t:
            out.append("tool versions changed: " + ", ".join(f"{k} {rec.tools.get(k)} -> {tools[k]}" for k in changed_t))
        return out

    def evaluate(self, stage: Stage, outputs: dict[str, dict[str, dict[str, Any]]], pending: Iterable[str] = (),
                 force: bool = False) -> StagePlan:
        """The one per-stage evaluation ``plan`` and ``run`` share: the stage's inputs, its fingerprint (None
        while a dependency in ``pending`` must run first or has no ``outputs`` yet) and why it must run
        (only "--force" with ``force``, which hashes no artifact)."""
        inputs = self.inputs_of(stage)
        deps = self.dep_hashes(stage, outputs)
        up = [d for d in stage.deps if d in pending]
        fp = None if deps is None or up else self.fingerprint(stage, inputs, deps)
        reasons = ["--force"] if force else self.check(stage, fp, up or [d for d in stage.deps if d not in outputs])
        return StagePlan(stage, fp, reasons, inputs)

    def up_to_date(self, plan: StagePlan) -> Optional[dict[str, dict[str, Any]]]:
        """The locked outputs of a stage that need not run; None when it must."""
        rec = self.lock.stages.get(plan.stage.name)
        return None if plan.reasons or rec is None else rec.outputs

    def plan(self) -> list[StagePlan]:
        """Dry plan: a stage downstream of a stale one is stale too, since its inputs are not known yet."""
        result: list[StagePlan] = []
        outputs: dict[str, dict[str, dict[str, Any]]] = {}
        stale: list[str] = []
        for stage in self.stages:
            plan = self.evaluate(stage, outputs, stale)
            result.append(plan)
            done = self.up_to_date(plan)
            if done is None:
                stale.append(stage.name)
            else:
                outputs[stage.name] = done
        return result


# ------------------------------------------------------------------------------------------------- run


@dataclass
class Event:
    """Progress reported to the CLI (which alone decides how to print it)."""

    kind: str  # start | done | skip | cached | log | fail | progress
    stage: str
    message: str = ""
    seconds: float = 0.0
    done: int = 0  # progress: items done of total
    total: int = 0


@dataclass
class RunOutcome:
    ran: list[str]
    cached: list[str]
    skipped: list[str]
    failed: list[str]
    drift: list[str]
    lock: lockfile.Lock
    timings: dict[str, float]
    restored: list[str] = field(default_factory=list)  # taken from the shared cache instead of run


class ResultStore(Protocol):
    """A shared cache of stage results (``reidbuild.cache.Store``): restore before running, push after commit.

    Both calls report problems through ``emit`` and return normally; only a store opened as required
    raises (``Unavailable``) when it cannot be reached.
    """

    def action_key(self, stage: Stage, fingerprint: str) -> Optional[str]: ...

    def restore(self, stage: Stage, key: str, emit: Callable[[Event], None]) -> Optional[StageResult]: ...

    def push(self, stage: Stage, key: str, result: StageResult, emit: Callable[[Event], None]) -> None: ...


class StageRunner(Protocol):
    """Where stages run: here by default, or elsewhere (``reidbuild.fleet``'s Ray runner)."""

    def unavailable(self, stage: Stage) -> Optional[str]: ...

    def execute(self, stage: Stage, fingerprint: str, ctx: StageContext,
                committed: dict[str, dict[str, Any]]) -> StageResult: ...


class LocalRunner:
    """Runs each stage in this process."""

    def unavailable(self, stage: Stage) -> Optional[str]:
        return stage.available() if stage.available else None

    def execute(self, stage: Stage, fingerprint: str, ctx: StageContext,
                committed: dict[str, dict[str, Any]]) -> StageResult:
        return stage.run(ctx)


# --------------------------------------------------------------------------------------- commit points

# Named moments of a run's commit sequence, in order, for a stage that runs (see docs/CONTRACTS.md):
#   artifact_replaced (stage, file)  one artifact renamed into place; the lock still describes the old one
#   lock_synced       (stage, lock)  the lock's temp file is complete and fsynced, not yet renamed over the lock
#   lock_written      (stage, lock)  the lock on disk holds the stage's entry (apply; never with --locked)
#   stage_done        (stage, "")    the stage is finished (run, restored, cached, skipped or refused); the
#                                    next one has not started
# The final lock write after the last stage reports lock_synced/lock_written with stage "".
COMMIT_POINTS = ("artifact_replaced", "lock_synced", "lock_written", "stage_done")
CommitHook = Callable[[str, str, str], None]
_commit_hooks: list[CommitHook] = []


def add_commit_hook(hook: CommitHook) -> Callable[[], None]:
    """Call ``hook(point, stage, file)`` at every commit point; returns the function that removes it.

    Crash tests install one in the process they kill, to die exactly between two durable writes.
    """
    _commit_hooks.append(hook)
    return lambda: _commit_hooks.remove(hook)


def commit_point(point: str, stage: str, file: str = "") -> None:
    """Announce that the run reached ``point`` (one of COMMIT_POINTS) for ``stage``."""
    for hook in tuple(_commit_hooks):
        hook(point, stage, file)


# ------------------------------------------------------------------------------------------ lock modes


def stage_record(stage: Stage, plan: Optional[StagePlan], status: str, record: dict[str, Any],
                 outputs: Optional[dict[str, dict[str, Any]]] = None,
                 seconds: Optional[float] = None) -> lockfile.StageRecord:
    """The lock entry of ``stage``; without a plan (an upstream stage was skipped, so it was never evaluated)
    it has no fingerprint, inputs or tools."""
    if plan is None or plan.fingerprint is None:
        return lockfile.StageRecord(fingerprint="", status=status, params=lockfile.plain(stage.params),
                                    record=record)
    return lockfile.StageRecord(fingerprint=plan.fingerprint, status=status, params=lockfile.plain(stage.params),
                                inputs=plan.inputs, outputs=outputs or {}, record=record,
                                tools=tool_versions(stage.tools), seconds=seconds)


class LockMode(Protocol):
    """What a run does with the lock: ``WriteLock`` (apply) records every stage and rewrites the lock after
    each; ``CheckLock`` (apply --locked) writes nothing and owns every comparison with the lock."""

    # a skipped stage skips its dependants even when they take partial deps (the report): --locked writes
    # nothing, and a partial report would only differ from the locked one
    propagates_skip: bool
    pushes: bool  # whether stages that ran are given to the shared cache

    def admit(self, plan: StagePlan, skipping: bool) -> None:
        """Before a stale stage runs (or is skipped as unavailable when ``skipping``): may refuse the run."""

    def accept(self, stage: Stage, entries: dict[str, dict[str, Any]]) -> None:
        """Before the rebuilt artifacts (their lock entries) are written: may refuse them."""

    def record(self, name: str, rec: lockfile.StageRecord, write: bool = True) -> None:
        """Record a stage's entry (and rewrite the lock now when ``write``)."""

    def settle(self) -> None:
        """After the last stage, success or not: make the lock on disk final."""

    def finish(self, stages: list[Stage], manifest_entry: dict[str, Any]) -> None:
        """After a complete run: whole-lock checks."""


class WriteLock:
    """apply: every stage's entry goes into the lock, rewritten atomically after each stage."""

    propagates_skip = False
    pushes = True

    def __init__(self, lock_path: Path, lock: lockfile.Lock, old: Optional[lockfile.Lock]) -> None:
        self.path = lock_path
        self.lock = lock
        self.old = old  # the lock as read at the start: a final lock equal to it is not even serialised again

    def admit(self, plan: StagePlan, skipping: bool) -> None:
        """Anything may run: apply rewrites the lock to match."""

    def accept(self, stage: Stage, entries: dict[str, dict[str, Any]]) -> None:
        """Any bytes are accepted: the lock records them."""

    def record(self, name: str, rec: lockfile.StageRecord, write: bool = True) -> None:
        """Keep the entry; with ``write``, make it durable before the next stage starts (crash safety)."""
        self.lock.stages[name] = rec
        if write:
            self._write(name)

    def settle(self) -> None:
        """The final write: entries recorded without a write (restored, skipped upstream) reach the disk."""
        self._write("", unchanged_from=self.old)

    def finish(self, stages: list[Stage], manifest_entry: dict[str, Any]) -> None:
        """Nothing to check: the lock was just written from this run."""

    def _write(self, stage: str, unchanged_from: Optional[lockfile.Lock] = None) -> None:
        lockfile.write(self.path, self.lock, unchanged_from=unchanged_from,
                       on_synced=lambda: commit_point("lock_synced", stage, self.path.name))
        commit_point("lock_written", stage, self.path.name)


class CheckLock:
    """apply --locked: a CI check that writes nothing and fails (CheckFailed) on the first difference from the
    lock; each difference is also listed in ``drift``."""

    propagates_skip = True
    pushes = False

    def __init__(self, lock_path: Path, old: Optional[lockfile.Lock], planner: Planner, drift: list[str]) -> None:
        if old is None:
            raise CheckFailed(f"{lock_path}: --locked given but there is no lock file; run apply without "
                              "--locked first")
        self.path = lock_path
        self.old = old
        self.planner = planner
        self.drift = drift

    def admit(self, plan: StagePlan, skipping: bool) -> None:
        """A tampered artifact, or a stage whose fingerprint or tools differ from the lock, fails the check.

        A stage this machine cannot run (TensorRT on a CPU-only CI) is skipped, not compared: its fingerprint
        includes tool versions that only exist where it can run.
        """
        stage, fp = plan.stage, plan.fingerprint
        tampered = [r for r in plan.reasons if r.startswith("artifact ") and r.endswith(" was modified")]
        if tampered:
            self.drift.extend(f"{stage.name}: {r}" for r in tampered)
            raise CheckFailed(f"{self.path}: --locked: {'; '.join(tampered)} (differs from the lock)")
        rec = self.old.stages.get(stage.name)
        if not skipping and (rec is None or rec.fingerprint != fp or tool_drift(rec)):
            why = "; ".join(self.planner.check(stage, fp, [])) or "fingerprint differs"
            self.drift.append(f"{stage.name}: {why}")
            raise CheckFailed(f"{self.path}: --locked: stage {stage.name} differs from the lock ({why})")

    def accept(self, stage: Stage, entries: dict[str, dict[str, Any]]) -> None:
        """Rebuilt reproducible artifacts must hash as locked; stop at the first stage that differs (later
        stages would only report the consequence)."""
        rec = self.old.stages.get(stage.name)
        diffs = [f for f, e in entries.items()
                 if stage.reproducible and (rec is None or rec.outputs.get(f, {}).get("sha256") != e["sha256"])]
        if diffs:
            self.drift.extend(f"{stage.name}/{f}" for f in diffs)
            raise CheckFailed(f"{self.path}: --locked: rebuilt artifacts differ from the lock: "
                              + ", ".join(diffs) + f" (stage {stage.name}; not written)")

    def record(self, name: str, rec: lockfile.StageRecord, write: bool = True) -> None:
        """Nothing is recorded: the lock stays as it was."""

    def settle(self) -> None:
        """Nothing is written."""

    def finish(self, stages: list[Stage], manifest_entry: dict[str, Any]) -> None:
        """The lock must not name stages the manifest dropped, nor an older manifest."""
        gone = sorted(set(self.old.stages) - {s.name for s in stages})
        if gone:
            raise CheckFailed(f"{self.path}: --locked: the lock has stages this manifest no longer builds: "
                              f"{', '.join(gone)} (run apply to update the lock)")
        if self.old.manifest.get("sha256") != manifest_entry.get("sha256"):
            raise CheckFailed(f"{self.path}: --locked: the manifest changed since the lock was written (no "
                              "artifact is affected; run apply to update the lock)")


# ------------------------------------------------------------------------------------------------- run

def _restore(stage: Stage, fp: str, store: ResultStore,
             emit: Callable[[Event], None]) -> tuple[Optional[StageResult], Optional[str]]:
    """The stage's result from the shared cache (None when it does not hold this action), and the action key."""
    key = store.action_key(stage, fp)
    return (store.restore(stage, key, emit) if key is not None else None), key


def _restore_or_run(stage: Stage, fp: str, reasons: list[str], ctx: StageContext,
                    committed: dict[str, dict[str, Any]], store: Optional[ResultStore], runner: StageRunner,
                    emit: Callable[[Event], None], may_restore: bool,
                    asked: tuple[Optional[StageResult], Optional[str]] = (None, None),
                    ) -> tuple[StageResult, Optional[str], bool]:
    """The stage's result from the shared cache when it holds this action (and ``may_restore``: not with
    --force, which means "prove it again here"; ``asked``: what the cache already answered), else from running it.

    Returns (result, action key or None, restored?).
    """
    early, key = asked
    if early is not None:
        return early, key, True
    if key is None and store is not None:
        key = store.action_key(stage, fp)
    if key is not None and may_restore and store is not None:
        restored = store.restore(stage, key, emit)
        if restored is not None:
            return restored, key, True
    emit(Event("start", stage.name, "; ".join(reasons)))
    bound_heap()
    try:
        return runner.execute(stage, fp, ctx, committed), key, False
    except ReidbuildError:
        raise
    except MemoryError:
        raise StageFailed(f"stage {stage.name}: out of memory") from None


def release_memory() -> None:
    """Hand memory freed by a finished stage back to the system (glibc keeps freed arenas otherwise), so a
    later stage's peak does not stack on an earlier one's.

    The full collection matters (cycles left by the export hold ~80 MB of arrays until it runs), but over the
    ~200,000 objects of PyTorch and onnx it costs 0.1-0.2 s of CPU each time. So the survivors
    are frozen afterwards: the next collection looks only at what later stages created. ``run`` unfreezes
    them when it ends, so nothing stays exempt from collection after the build."""
    gc.collect()
    heap.trim()
    gc.freeze()


def bound_heap() -> None:
    """Large buffers from their own mappings, returned when freed (``reidbuild.heap.bound_heap``). Called
    once before the first stage runs."""
    heap.bound_heap()


@dataclass
class Decision:
    """What the run does with one stage, decided before anything is executed or written."""

    verdict: Literal["skip", "cached", "unavailable", "run"]
    plan: Optional[StagePlan]  # None: skipped because an upstream stage was (never evaluated)
    why: str = ""  # skip / unavailable: the reason
    # the shared cache asked before probing for tools (result or None, action key), and when it was asked
    asked: tuple[Optional[StageResult], Optional[str]] = (None, None)
    asked_at: float = 0.0


@dataclass
class Executed:
    """A stage's result, restored from the shared cache or run, not yet committed."""

    result: StageResult
    key: Optional[str]  # the shared-cache action key, if a store is configured
    restored: bool
    seconds: float


@dataclass
class _Loop:
    """One run's state while it walks the stages: decide, then execute, then commit, stage by stage."""

    output_dir: Path
    base: Path
    emit: Callable[[Event], None]
    planner: Planner
    mode: LockMode
    outcome: RunOutcome
    store: Optional[ResultStore]
    runner: StageRunner
    force: bool
    skip_unavailable: bool
    cache: dict[str, Any] = field(default_factory=dict)  # the per-run memo stages share (StageContext.cached)
    outputs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # stage -> committed outputs
    skipped: set[str] = field(default_factory=set)
    refused: dict[str, NotExpressible] = field(default_factory=dict)  # raised at the end, first one first
    unavailable: Optional[Unavailable] = None

    def step(self, stage: Stage) -> bool:
        """Decide, execute and commit one stage; False when the run must stop (an unavailable stage)."""
        d = self.decide(stage)
        if d.verdict == "skip":
            self.skip(stage, d)
        elif d.verdict == "cached":
            self.outputs[stage.name] = self.planner.lock.stages[stage.name].outputs
            self.outcome.cached.append(stage.name)
            self.emit(Event("cached", stage.name, "up to date"))
        elif d.verdict == "unavailable":
            self.unavailable = Unavailable(f"stage {stage.name}: {d.why} (use --skip-unavailable to record it "
                                           "as skipped)")
            return False
        elif d.plan is not None:
            done = self.execute(stage, d.plan, d)
            if done is not None:
                self.commit(stage, d.plan, done)
                failed, restored, seconds = done.result.failed, done.restored, done.seconds
                del done  # the artifacts are on disk: do not hold their bytes while the next stage runs
                if not restored:  # a restore built no model or graph; a full collection would only cost time
                    release_memory()
                self.report(stage, failed, restored, seconds)
        return True

    def decide(self, stage: Stage) -> Decision:
        """Skip (upstream skipped, or unavailable here with --skip-unavailable), up to date, unavailable, or
        run; the lock mode may refuse a stale stage (--locked)."""
        if any(d in self.skipped for d in stage.deps) and (self.mode.propagates_skip or not stage.partial_deps):
            why = ("upstream stage was refused" if any(d in self.refused for d in stage.deps)
                   else "upstream stage was skipped")
            return Decision("skip", None, why)
        plan = self.planner.evaluate(stage, self.outputs, force=self.force)
        if self.planner.up_to_date(plan) is not None:
            return Decision("cached", plan)
        asked_at = time.perf_counter()
        # a stage the cache holds needs no tool here: ask it before probing for one (e.g. importing pycaffe)
        asked = (_restore(stage, plan.fingerprint, self.store, self.emit)
                 if self.store is not None and self.asks_cache_first() and plan.fingerprint is not None
                 else (None, None))
        why_not = None if asked[0] is not None else self.runner.unavailable(stage)
        self.mode.admit(plan, skipping=bool(why_not) and self.skip_unavailable)
        if why_not:
            return Decision("skip" if self.skip_unavailable else "unavailable", plan, why_not)
        return Decision("run", plan, asked=asked, asked_at=asked_at)

    def asks_cache_first(self) -> bool:
        """Whether a stale stage's result is looked up in the shared cache before its tools are probed: not
        with --force ("prove it again here") nor --locked (a check that restores nothing before the probe)."""
        return self.store is not None and not self.force and self.mode.pushes

    def skip(self, stage: Stage, d: Decision) -> None:
        """Record a skipped stage; one skipped for its upstream is only kept in memory until the next write."""
        self.skipped.add(stage.name)
        self.outcome.skipped.append(stage.name)
        self.emit(Event("skip", stage.name, d.why))
        rec = stage_record(stage, d.plan, "skipped", {"reason": d.why})
        if d.plan is None:
            self.outcome.lock.stages[stage.name] = rec
        else:
            self.mode.record(stage.name, rec)

    def execute(self, stage: Stage, plan: StagePlan, d: Decision) -> Optional[Executed]:
        """Restore or run the stage; None when its format cannot express the model (recorded ``refused``)."""
        assert plan.fingerprint is not None  # every dep was committed, or was skipped and skipped this stage
        t0 = d.asked_at if d.asked[0] is not None else time.perf_counter()
        name = stage.name
        ctx = StageContext(self.output_dir, self.cache, lambda msg: self.emit(Event("log", name, msg)), plan.inputs,
                           progress=lambda what, d, t: self.emit(Event("progress", name, what, 0.0, d, t)),
                           lock=self.outcome.lock, up_to_date=tuple(self.outcome.cached))
        committed = {f: e for d in stage.deps for f, e in self.outputs.get(d, {}).items()}
        try:
            result, key, restored = _restore_or_run(stage, plan.fingerprint, plan.reasons, ctx, committed,
                                                    self.store, self.runner, self.emit,
                                                    may_restore=not (self.force or self.asks_cache_first()),
                                                    asked=d.asked)
        except NotExpressible as exc:
            # the target format cannot express this model: other targets of the manifest still build
            self.refused[name] = exc
            self.skipped.add(name)
            self.emit(Event("fail", name, exc.message, time.perf_counter() - t0))
            self.mode.record(name, stage_record(stage, plan, "refused", {"reason": exc.message}))
            return None
        missing = set(stage.outputs) - set(result.outputs)
        extra = set(result.outputs) - set(stage.outputs)
        if missing or extra:
            raise StageFailed(f"stage {name} produced {sorted(result.outputs)}, declared {list(stage.outputs)}")
        seconds = time.perf_counter() - t0
        self.outcome.timings[name] = seconds
        if result.seconds is None:
            result.seconds = round(seconds, 3)
        return Executed(result, key, restored, seconds)

    def commit(self, stage: Stage, plan: StagePlan, done: Executed) -> None:
        """Write each artifact atomically, then the stage's lock entry (crash safety: the lock never names
        bytes that are not on disk), then give what ran to the shared cache."""
        result = done.result
        entries = self.entries(stage, result)
        self.mode.accept(stage, entries)
        for fname in stage.outputs:
            written = atomic_write(self.output_dir, fname, result.outputs[fname])
            if isinstance(self.planner.hashes, StatCache):
                self.planner.hashes.record(written, entries[fname]["sha256"])
            commit_point("artifact_replaced", stage.name, fname)
        self.outputs[stage.name] = entries
        rec = stage_record(stage, plan, "failed" if result.failed else "ok", result.record, entries, result.seconds)
        # a restore is cheap to redo: its entry waits for the next write of the lock
        self.mode.record(stage.name, rec, write=not done.restored)
        if self.store is not None and done.key is not None and self.mode.pushes and not done.restored:
            self.store.push(stage, done.key, result, self.emit)

    def entries(self, stage: Stage, result: StageResult) -> dict[str, dict[str, Any]]:
        """The lock's outputs entries (path, sha256, size) of a stage's result."""
        out: dict[str, dict[str, Any]] = {}
        for fname in stage.outputs:
            # the folder is resolved, never the file: a link planted at its name is replaced, not recorded
            out[fname] = {"path": _rel(self.output_dir.resolve() / fname, self.base, follow=False),
                          "sha256": result.sha256.get(fname) or sha256_bytes(result.outputs[fname]),
                          "size": len(result.outputs[fname])}
            if not stage.reproducible:
                out[fname]["reproducible"] = False
        return out

    def report(self, stage: Stage, failed: Optional[str], restored: bool, seconds: float) -> None:
        """Count the committed stage in the outcome and tell the CLI."""
        if restored:
            self.outcome.restored.append(stage.name)
            self.emit(Event("restored", stage.name, "restored from cache", seconds))
            return
        self.outcome.ran.append(stage.name)
        if failed:
            self.outcome.failed.append(f"{stage.name}: {failed}")
            self.emit(Event("fail", stage.name, failed, seconds))
        else:
            self.emit(Event("done", stage.name, "", seconds))

    def cleanup(self) -> None:
        """Remove the run's scratch folder and persist the stat cache (also after a failure)."""
        tmp = self.cache.get("_tmp")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(self.planner.hashes, StatCache):
            self.planner.hashes.save()


def run(stages: list[Stage], *, lock_path: Path, manifest_entry: dict[str, Any], output_dir: Path, base: Path,
        emit: Callable[[Event], None], locked: bool = False, skip_unavailable: bool = False,
        force: bool = False, store: Optional[ResultStore] = None, runner: Optional[StageRunner] = None,
        ) -> RunOutcome:
    """Run every stale stage in order, committing each stage's artifacts and then the lock.

    Each artifact is written atomically and the lock is rewritten after every stage, so a crash leaves
    complete files and a lock that describes only what was committed. With ``locked`` nothing in the lock
    is rewritten: any artifact whose bytes differ from the lock is reported as drift (CheckFailed).
    With a ``store``, a stale stage whose action the shared cache holds is restored instead of run, and
    each stage that ran is pushed after its commit; ``runner`` decides where stages run (default: here).
    """
    global _run_versions
    ensure_dir(output_dir)
    clean_temp_files(output_dir)
    clean_temp_files(lock_path.parent)
    old = lockfile.read(lock_path)
    names = {s.name for s in stages}
    new = lockfile.Lock(manifest=manifest_entry,
                        stages={} if old is None else {k: v for k, v in old.stages.items() if k in names})
    # apply trusts the stat cache for unchanged files; --locked is a tamper check and re-hashes everything
    planner = Planner(stages, old, output_dir, base, open_cache(output_dir, trust=not locked))
    outcome = RunOutcome([], [], [], [], [], new, {})
    mode: LockMode = CheckLock(lock_path, old, planner, outcome.drift) if locked else WriteLock(lock_path, new, old)
    loop = _Loop(output_dir, base, emit, planner, mode, outcome, store, runner or LocalRunner(), force,
                 skip_unavailable)
    _run_versions = {}
    try:
        for stage in stages:
            if not loop.step(stage):
                break
            commit_point("stage_done", stage.name)
    finally:
        _run_versions = None
        gc.unfreeze()  # objects frozen by release_memory are collectable again
        loop.cleanup()
    mode.settle()
    if loop.unavailable is not None:
        raise loop.unavailable
    if loop.refused:
        raise next(iter(loop.refused.values()))
    mode.finish(stages, manifest_entry)
    return outcome
