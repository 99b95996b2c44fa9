"""Build one manifest, or many: serially, in local processes (``--jobs N``) or on a Ray cluster (``--ray``).

One manifest's failure never stops the others: each gets a ``ManifestResult`` (exit code and message, as
the CLI would report it alone), and the fleet's exit code is the worst one. Each lock is written by the
process that holds that manifest's output folder (the driver, with Ray).
"""
from __future__ import annotations

import glob
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import pipeline
from .errors import InputError, ReidbuildError, classify
from .provenance import OriginTracker, write_run_record

if TYPE_CHECKING:  # process pools are imported where used: a single apply (a no-op above all) needs none
    import concurrent.futures as cf

Emit = Callable[[pipeline.Event], None]


@dataclass(frozen=True)
class ApplyOptions:
    """``apply``'s switches that apply to every manifest of a run."""

    locked: bool = False
    skip_unavailable: bool = False
    force: bool = False
    wait: bool = True
    cache: Optional[str] = None  # fsspec URL of the shared cache
    cache_required: bool = False
    cache_push: bool = True


@dataclass
class ManifestResult:
    """What happened to one manifest (picklable: it comes back from worker processes)."""

    manifest: str
    exit_code: int = 0
    message: str = ""
    ran: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cache_problems: list[str] = field(default_factory=list)
    placement: dict[str, str] = field(default_factory=dict)  # stage -> Ray node id (with --ray)
    lock: str = ""
    provenance: str = ""  # the run record: where each artifact in the output folder came from

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def expand_manifests(args: list[str]) -> list[Path]:
    """Manifest files from paths, folders (their ``*.yml``/``*.yaml``) and globs, in order, without repeats."""
    out: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in (".yml", ".yaml") and q.is_file())
            if not found:
                raise InputError(f"{arg}: folder holds no manifest (*.yml, *.yaml)")
        elif any(c in arg for c in "*?["):
            found = sorted(Path(q) for q in glob.glob(arg) if Path(q).is_file())
            if not found:
                raise InputError(f"{arg}: the pattern matches no manifest file")
        else:
            found = [p]
        out.extend(q for q in found if q not in out)
    return out


def open_cache(opts: ApplyOptions) -> Any:
    """The shared cache the options name, or None."""
    if not opts.cache:
        return None
    from .cache import open_store

    return open_store(opts.cache, required=opts.cache_required, push=opts.cache_push and not opts.locked)


def apply_manifest(path: Path, opts: ApplyOptions, emit: Emit,
                   runner: Optional[pipeline.StageRunner] = None,
                   on_wait: Optional[Callable[[str], None]] = None) -> ManifestResult:
    """Build one manifest under its output folder's run lock; raises what the CLI turns into exit codes."""
    from .fsutil import ensure_dir, run_lock
    from .manifest import load_manifest
    from .stages.assemble import assemble

    lm = load_manifest(path)
    stages = assemble(lm).stages
    out_dir = ensure_dir(lm.output_dir)
    store = open_cache(opts)
    tracker = OriginTracker(emit)
    record: Optional[Path] = None
    with run_lock(out_dir, opts.wait, on_wait=on_wait):
        try:
            outcome = pipeline.run(stages, lock_path=lm.lock_path, output_dir=out_dir, base=lm.base, emit=tracker,
                                   manifest_entry={"path": lm.path.name, "sha256": lm.sha256},
                                   locked=opts.locked, skip_unavailable=opts.skip_unavailable, force=opts.force,
                                   store=store, runner=runner)
        finally:  # also after a failed stage: what was committed before it has an origin too
            record = _record_provenance(out_dir, lm.lock_path, tracker, opts, store, runner)
    return ManifestResult(str(path), ran=outcome.ran, restored=outcome.restored, cached=outcome.cached,
                          skipped=outcome.skipped, failed=outcome.failed, drift=outcome.drift,
                          timings={k: round(v, 3) for k, v in outcome.timings.items()},
                          cache_problems=list(store.problems) if store is not None else [],
                          lock=str(lm.lock_path), provenance=str(record) if record else "")


def _record_provenance(out_dir: Path, lock_path: Path, tracker: OriginTracker, opts: ApplyOptions, store: Any,
                       runner: Optional[pipeline.StageRunner]) -> Optional[Path]:
    """Write the run record (informational: a folder that refuses it, or a lock that cannot be read - the run's
    own error says why - does not fail the build it describes or hide that error)."""
    try:
        return write_run_record(out_dir, lock_path, tracker, opts.cache,
                                getattr(store, "restored_from", {}), getattr(runner, "placement", {}))
    except (OSError, ReidbuildError):
        return None


def settle(result: ManifestResult) -> ManifestResult:
    """Turn a finished run's failed checks and drift into its exit code, as a single ``apply`` would."""
    from .errors import CheckFailed

    if result.exit_code == 0 and (result.drift or result.failed):
        exc = CheckFailed("--locked: artifacts differ from the lock: " + ", ".join(result.drift)
                          if result.drift else "; ".join(result.failed))
        result.exit_code, result.message = classify(exc)
    return result


def apply_one_safely(path: Path, opts: ApplyOptions, emit: Emit,
                     runner: Optional[pipeline.StageRunner] = None) -> ManifestResult:
    """``apply_manifest`` with any error caught into the result, so the other manifests go on."""
    try:
        return settle(apply_manifest(path, opts, emit, runner))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - each manifest's error becomes its own result
        code, message = classify(exc)
        return ManifestResult(str(path), exit_code=code, message=message)


def run_fleet(paths: list[Path], opts: ApplyOptions, emit_for: Callable[[str], Emit],
              jobs: int = 1) -> list[ManifestResult]:
    """Build every manifest here; ``emit_for(label)`` gives each manifest's event printer (it must be picklable
    for ``jobs`` > 1: it travels to a worker process). On a Ray cluster: ``raycluster.run_on_ray``."""
    if jobs <= 1:
        return [apply_one_safely(p, opts, emit_for(label(p))) for p in paths]
    import concurrent.futures as cf
    import multiprocessing

    # spawn, not fork: a forked copy of a process that already imported torch/onnxruntime threads can hang
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=share_cores,
                                initargs=(jobs,)) as pool:
        futures = [pool.submit(apply_one_safely, p, opts, emit_for(label(p))) for p in paths]
        return [_result_of(f, p) for f, p in zip(futures, paths)]


def threads_per_job(jobs: int) -> int:
    """This machine's usable cores divided among ``jobs`` builds (at least one thread each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def share_cores(jobs: int) -> None:
    """Worker-process initializer: each build gets its share of the cores instead of one thread per core
    (N jobs x all cores oversubscribes the CPUs: threads then wait on each other's time slices). PyTorch reads
    OMP_NUM_THREADS when it starts, onnxruntime through ``session_options``; a value the user set stays."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_job(jobs)))


def _result_of(future: "cf.Future[ManifestResult]", path: Path) -> ManifestResult:
    """A worker process that died (killed, out of memory) is that manifest's failure, not the fleet's."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool as exc:
        code, message = classify(exc)
        return ManifestResult(str(path), exit_code=code, message=f"worker process died: {message}")


def run_threads(paths: list[Path], work: Callable[[Path], ManifestResult]) -> list[ManifestResult]:
    """Run ``work`` for each manifest in its own thread (Ray's driver: the tasks do the work elsewhere)."""
    results: dict[Path, ManifestResult] = {}

    def one(p: Path) -> None:
        results[p] = work(p)

    threads = [threading.Thread(target=one, args=(p,), name=f"reidbuild-{label(p)}") for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[p] for p in paths]


def label(path: Path) -> str:
    """A short name for a manifest in progress lines: its file name, with its folder when that is ambiguous."""
    return os.path.join(path.parent.name, path.name) if path.parent.name else path.name


def worst(results: list[ManifestResult]) -> int:
    """The fleet's exit code: the highest (most severe) of the manifests' codes."""
    return max((r.exit_code for r in results), default=0)
