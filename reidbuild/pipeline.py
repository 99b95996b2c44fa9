"""Plan and run: turn stages into a fingerprinted plan, run what is stale, commit artifacts and the lock.

Stages (``reidbuild/stages/*``) describe themselves as ``Stage`` values; this module knows nothing of
ONNX or Caffe. Data flows one way: manifest -> stages -> artifacts -> lock.
"""
from __future__ import annotations

import functools
import gc
import importlib.metadata
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from . import lockfile
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
    stage: Stage
    fingerprint: Optional[str]  # None when an upstream stage must run first
    reasons: list[str]

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

    def plan(self) -> list[StagePlan]:
        """Dry plan: a stage downstream of a stale one is stale too, since its inputs are not known yet."""
        result: list[StagePlan] = []
        outputs: dict[str, dict[str, dict[str, Any]]] = {}
        stale_names: list[str] = []
        for stage in self.stages:
            inputs = self.inputs_of(stage)
            deps = self.dep_hashes(stage, outputs)
            up = [d for d in stage.deps if d in stale_names]
            fp = None if deps is None or up else self.fingerprint(stage, inputs, deps)
            reasons = self.check(stage, fp, up or [d for d in stage.deps if d not in outputs])
            result.append(StagePlan(stage, fp, reasons))
            rec = self.lock.stages.get(stage.name)
            if reasons or rec is None:
                stale_names.append(stage.name)
            else:
                outputs[stage.name] = rec.outputs
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


def _record_refusal(lock: lockfile.Lock, lock_path: Path, stage: Stage, fp: str, inputs: dict[str, Any],
                    reason: str) -> None:
    """Lock entry of a stage whose format cannot express the model: status ``refused`` and the reason."""
    lock.stages[stage.name] = lockfile.StageRecord(
        fingerprint=fp, status="refused", params=lockfile.plain(stage.params), inputs=inputs,
        record={"reason": reason}, tools=tool_versions(stage.tools))
    lockfile.write(lock_path, lock)


def release_memory() -> None:
    """Hand memory freed by a finished stage back to the system (glibc keeps freed arenas otherwise), so a
    later stage's peak does not stack on an earlier one's.

    The full collection matters (cycles left by the export hold ~80 MB of arrays until it runs), but over the
    ~200,000 objects of PyTorch, onnx and matplotlib it costs 0.1-0.2 s of CPU each time. So the survivors
    are frozen afterwards: the next collection looks only at what later stages created. ``run`` unfreezes
    them when it ends, so nothing stays exempt from collection after the build."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    gc.freeze()


def bound_heap() -> None:
    """Serve allocations of 4 MiB and more from their own mappings, returned to the system when freed.

    glibc raises its mmap threshold (up to 32 MiB) each time such a block is freed, after which tensors and
    buffers of a few MB land in the heap, where freed ones leave holes ``malloc_trim`` cannot return: a full
    R50 build peaked ~50 MB higher that way. Called once before the first stage runs."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD; setting it also stops the dynamic adjustment


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc through ctypes, or None where there is none (musl, macOS); looked up once (find_library runs
    ldconfig)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


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
    runner = runner or LocalRunner()
    _run_versions = {}
    ensure_dir(output_dir)
    clean_temp_files(output_dir)
    clean_temp_files(lock_path.parent)
    old = lockfile.read(lock_path)
    new = lockfile.Lock(manifest=manifest_entry,
                        stages={} if old is None else {k: v for k, v in old.stages.items()
                                                       if k in {s.name for s in stages}})
    # apply trusts the stat cache for unchanged files; --locked is a tamper check and re-hashes everything
    hashes = open_cache(output_dir, trust=not locked)
    planner = Planner(stages, old, output_dir, base, hashes)
    cache: dict[str, Any] = {}
    outcome = RunOutcome([], [], [], [], [], new, {})
    outputs: dict[str, dict[str, dict[str, Any]]] = {}
    skipped_names: set[str] = set()
    unavailable: Optional[Unavailable] = None
    refused: dict[str, NotExpressible] = {}  # stages whose format cannot express the model (raised at the end)
    if locked and old is None:
        raise CheckFailed(f"{lock_path}: --locked given but there is no lock file; run apply without --locked first")
    try:
        for stage in stages:
            # --locked writes nothing: a partial report would only differ from the lock's, so skip it too
            if any(d in skipped_names for d in stage.deps) and (locked or not stage.partial_deps):
                why = ("upstream stage was refused" if any(d in refused for d in stage.deps)
                       else "upstream stage was skipped")
                skipped_names.add(stage.name)
                outcome.skipped.append(stage.name)
                emit(Event("skip", stage.name, why))
                new.stages[stage.name] = lockfile.StageRecord(fingerprint="", status="skipped",
                                                              params=lockfile.plain(stage.params),
                                                              record={"reason": why})
                continue
            inputs = planner.inputs_of(stage)
            deps = planner.dep_hashes(stage, outputs) or {}
            fp = planner.fingerprint(stage, inputs, deps)
            reasons = ["--force"] if force else planner.check(stage, fp, [])
            rec_old = None if old is None else old.stages.get(stage.name)
            if not reasons and rec_old is not None:
                outputs[stage.name] = rec_old.outputs
                outcome.cached.append(stage.name)
                emit(Event("cached", stage.name, "up to date"))
                continue
            t_ask = time.perf_counter()
            # a stage the cache holds needs no tool here: ask it before probing for one (e.g. importing pycaffe)
            ask_first = store is not None and not (force or locked)
            asked = _restore(stage, fp, store, emit) if store is not None and ask_first else (None, None)
            why_not = None if asked[0] is not None else runner.unavailable(stage)
            tampered = [r for r in reasons if r.startswith("artifact ") and r.endswith(" was modified")]
            if locked and tampered:
                outcome.drift.extend(f"{stage.name}: {r}" for r in tampered)
                raise CheckFailed(f"{lock_path}: --locked: {'; '.join(tampered)} (differs from the lock)")
            # a stage this machine cannot run (e.g. TensorRT on a CPU-only CI) is skipped, not compared:
            # its fingerprint includes tool versions that only exist where it can run
            if locked and not (why_not and skip_unavailable) and (
                    rec_old is None or rec_old.fingerprint != fp or tool_drift(rec_old)):
                why = "; ".join(planner.check(stage, fp, [])) or "fingerprint differs"
                outcome.drift.append(f"{stage.name}: {why}")
                raise CheckFailed(f"{lock_path}: --locked: stage {stage.name} differs from the lock ({why})")
            if why_not:
                if skip_unavailable:
                    skipped_names.add(stage.name)
                    outcome.skipped.append(stage.name)
                    emit(Event("skip", stage.name, why_not))
                    if not locked:
                        new.stages[stage.name] = lockfile.StageRecord(
                            fingerprint=fp, status="skipped", params=lockfile.plain(stage.params),
                            inputs=inputs, record={"reason": why_not}, tools=tool_versions(stage.tools))
                        lockfile.write(lock_path, new)
                    continue
                unavailable = Unavailable(f"stage {stage.name}: {why_not} (use --skip-unavailable to record it "
                                          "as skipped)")
                break
            t0 = t_ask if asked[0] is not None else time.perf_counter()
            ctx = StageContext(output_dir, cache, lambda msg, _n=stage.name: emit(Event("log", _n, msg)), inputs,
                               progress=lambda what, d, t, _n=stage.name: emit(Event("progress", _n, what, 0.0, d, t)),
                               lock=new, up_to_date=tuple(outcome.cached))
            committed = {f: e for d in stage.deps for f, e in outputs.get(d, {}).items()}
            try:
                result, key, restored = _restore_or_run(stage, fp, reasons, ctx, committed, store, runner, emit,
                                                        may_restore=not (force or ask_first), asked=asked)
            except NotExpressible as exc:
                # the target format cannot express this model: other targets of the manifest still build
                refused[stage.name] = exc
                skipped_names.add(stage.name)
                emit(Event("fail", stage.name, exc.message, time.perf_counter() - t0))
                if not locked:
                    _record_refusal(new, lock_path, stage, fp, inputs, exc.message)
                continue
            missing = set(stage.outputs) - set(result.outputs)
            extra = set(result.outputs) - set(stage.outputs)
            if missing or extra:
                raise StageFailed(f"stage {stage.name} produced {sorted(result.outputs)}, declared {list(stage.outputs)}")
            seconds = time.perf_counter() - t0
            outcome.timings[stage.name] = seconds
            if result.seconds is None:
                result.seconds = round(seconds, 3)
            out_entries: dict[str, dict[str, Any]] = {}
            for fname in stage.outputs:
                # the folder is resolved, never the file: a link planted at its name is replaced, not recorded
                out_entries[fname] = {"path": _rel(output_dir.resolve() / fname, base, follow=False),
                                      "sha256": result.sha256.get(fname) or sha256_bytes(result.outputs[fname]),
                                      "size": len(result.outputs[fname])}
                if not stage.reproducible:
                    out_entries[fname]["reproducible"] = False
            if locked:
                diffs = [f for f, e in out_entries.items()
                         if stage.reproducible and (rec_old is None or rec_old.outputs.get(f, {}).get("sha256") != e["sha256"])]
                if diffs:  # stop here: later stages would only report the consequence
                    outcome.drift.extend(f"{stage.name}/{f}" for f in diffs)
                    raise CheckFailed(f"{lock_path}: --locked: rebuilt artifacts differ from the lock: "
                                      + ", ".join(diffs) + f" (stage {stage.name}; not written)")
            for fname in stage.outputs:
                written = atomic_write(output_dir, fname, result.outputs[fname])
                if isinstance(hashes, StatCache):
                    hashes.record(written, out_entries[fname]["sha256"])
            status = "failed" if result.failed else "ok"
            outputs[stage.name] = out_entries
            if not locked:
                new.stages[stage.name] = lockfile.StageRecord(
                    fingerprint=fp, status=status, params=lockfile.plain(stage.params), inputs=inputs,
                    outputs=out_entries, record=result.record, tools=tool_versions(stage.tools),
                    seconds=result.seconds)
                if not restored:  # a restore is cheap to redo: its entry waits for the next write of the lock
                    lockfile.write(lock_path, new)
            if store is not None and key is not None and not locked and not restored:
                store.push(stage, key, result, emit)
            failed_msg = result.failed
            del result  # the artifacts are on disk: do not hold their bytes while the next stage runs
            if not restored:  # a restore built no model or graph; a full collection would only cost time
                release_memory()
            if restored:
                outcome.restored.append(stage.name)
                emit(Event("restored", stage.name, "restored from cache", seconds))
                continue
            outcome.ran.append(stage.name)
            if failed_msg:
                outcome.failed.append(f"{stage.name}: {failed_msg}")
                emit(Event("fail", stage.name, failed_msg, seconds))
            else:
                emit(Event("done", stage.name, "", seconds))
    finally:
        _run_versions = None
        gc.unfreeze()  # objects frozen by release_memory are collectable again
        tmp = cache.get("_tmp")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(hashes, StatCache):
            hashes.save()
    if not locked:
        lockfile.write(lock_path, new, unchanged_from=old)
    if unavailable is not None:
        raise unavailable
    if refused:
        raise next(iter(refused.values()))
    if locked and old is not None:
        gone = sorted(set(old.stages) - {s.name for s in stages})
        if gone:
            raise CheckFailed(f"{lock_path}: --locked: the lock has stages this manifest no longer builds: "
                              f"{', '.join(gone)} (run apply to update the lock)")
        if old.manifest.get("sha256") != manifest_entry.get("sha256"):
            raise CheckFailed(f"{lock_path}: --locked: the manifest changed since the lock was written (no "
                              "artifact is affected; run apply to update the lock)")
    return outcome
