"""The command line: the one place that prints and chooses exit codes.

Exit codes: 0 ok; 1 parity, verify (--rebuild) or --locked check failed; 2 invalid manifest, patch, config,
checkpoint or image; 3 a backend or tool the manifest needs is unavailable here; 4 another run holds
the output folder; 5 a stage's tool failed; 6 the file system refused a read or write (disk full,
permission denied, read-only); 70 internal error (a bug: please report); 130 interrupted.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads wreck latency on small machines
os.environ.setdefault("GLOG_minloglevel", "2")  # keep pycaffe quiet

from . import launch, noopcache  # the no-op fast path runs before click, pydantic and PyYAML load

if __name__ == "__main__" or Path(sys.argv[0]).name == "reidbuild":  # run as the command, not imported
    if noopcache.replay(sys.argv[1:], time.perf_counter()):
        sys.exit(0)
    launch.reexec_with_hugepages(sys.argv[1:])  # a build gets huge pages: one exec, before anything is read
    noopcache.watch(sys.argv[1:])

import click

from .errors import CheckFailed, InputError

if TYPE_CHECKING:
    from .manifest import LoadedManifest
    from .pipeline import Stage

EXIT_OK, EXIT_IO, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 6, 70, 130


def _fail(exc: BaseException) -> NoReturn:
    from .errors import classify

    code, message = classify(exc)
    if code == EXIT_INTERNAL and os.environ.get("REIDBUILD_DEBUG"):
        raise exc
    first, _, rest = message.partition("\n")
    prefix = "error: " if code not in (EXIT_INTERNAL, EXIT_INTERRUPTED) else ""
    click.echo(f"{prefix}{first}", err=True)
    if rest:
        click.echo(rest, err=True)
    sys.exit(code)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SystemExit:
            raise
        except click.exceptions.ClickException:
            raise
        except BaseException as exc:  # noqa: BLE001 - the one place errors become messages
            _fail(exc)
    return wrapper


def _load(manifest: str) -> tuple[LoadedManifest, list[Stage]]:
    from .manifest import load_manifest
    from .stages.assemble import assemble

    lm = load_manifest(Path(manifest))
    return lm, assemble(lm).stages


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


class BackendChoice(click.Choice):  # type: ignore[type-arg]
    """``torch`` plus every runner the registered targets declare, read when used (targets may register late)."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from . import targets

        return ("torch",) + targets.backend_names()

    @choices.setter
    def choices(self, value: Any) -> None:
        """click's constructor sets the choices; this type always reads them from the registry."""


MANIFEST = click.argument("manifest", type=click.Path(dir_okay=False))
JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress or stage lines on stderr (errors still show).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reidbuild")
def main() -> None:
    """reidbuild: build fast-reid models into ONNX, Caffe and TensorRT from a manifest, with a lock and parity."""


@main.command()
@MANIFEST
@JSON
@_guard
def validate(manifest: str, as_json: bool) -> None:
    """Validate the manifest and everything it names (config, checkpoint, patches, images); build nothing."""
    from .fsutil import HashCache
    from .pipeline import file_entry

    lm, stages = _load(manifest)
    hashes = HashCache()
    for stage in stages:  # every input file exists and is readable (checkpoint, config, patches, images)
        for path in stage.inputs.values():
            file_entry(path, lm.base, hashes)
    out = lm.output_dir
    if out.exists() and not out.is_dir():
        raise InputError(f"{lm.where('output_dir')}: output_dir {out} exists and is not a folder")
    if as_json:
        _emit_json({"manifest": str(lm.path), "valid": True, "stages": [s.name for s in stages]})
    else:
        click.echo(f"{lm.path}: valid ({len(stages)} stages)")


@main.command()
@_guard
def schema() -> None:
    """Print the manifest's JSON Schema (for editor completion and checking)."""
    from .manifest import json_schema

    click.echo(json_schema())


@main.command()
@MANIFEST
@JSON
@click.option("--diff", is_flag=True, help="Show, per graph patch, the graph before and after.")
@_guard
def plan(manifest: str, as_json: bool, diff: bool) -> None:
    """Show which stages would run and why."""
    from . import lockfile
    from .pipeline import Planner
    from .statcache import open_cache

    lm, stages = _load(manifest)
    hashes = open_cache(lm.output_dir, trust=lm.output_dir.is_dir())  # read-only here: plan holds no run lock
    planner = Planner(stages, lockfile.read(lm.lock_path), lm.output_dir, lm.base, hashes)
    plans = planner.plan()
    unavailable = {s.name: s.available() for s in stages if s.available}
    rows: list[dict[str, Any]] = [
        {"stage": p.stage.name, "stale": p.stale, "reasons": p.reasons, "outputs": list(p.stage.outputs),
         "unavailable": unavailable.get(p.stage.name), "description": p.stage.description} for p in plans]
    diffs: list[dict[str, str]] = []
    if diff:
        diffs = [{"stage": s.name, "patch": str(p), "diff": d}
                 for s in stages if s.diff is not None for p, d in s.diff(lm.output_dir)]
    if as_json:
        _emit_json({"manifest": str(lm.path), "stages": rows, "diffs": diffs})
        return
    for r in rows:
        mark = "run " if r["stale"] else "ok  "
        why = "; ".join(r["reasons"]) if r["stale"] else "up to date"
        extra = f"  [unavailable here: {r['unavailable']}]" if r["unavailable"] else ""
        click.echo(f"{mark} {r['stage']:<22} {why}{extra}")
    n = sum(r["stale"] for r in rows)
    click.echo(f"{n} of {len(rows)} stages would run" if n else "nothing to do: every stage is up to date")
    for d in diffs:
        click.echo(f"\n### {d['stage']}: {d['patch']}\n{d['diff']}")
    if diff and not diffs:
        click.echo("no graph patches in this manifest: nothing to diff")


def print_event(label: str, ev: Any) -> None:
    """One line on stderr for a pipeline event (module level: fleet worker processes pickle it). Progress
    events are left out here: many manifests at once get stage lines, not interleaved bars."""
    from .console import event_text

    text = event_text(label, ev)
    if text is not None:
        click.echo(text, err=True)


def _fleet_printer(label: str) -> Callable[[Any], None]:
    import functools

    return functools.partial(print_event, label)


@main.command()
@click.argument("manifests", nargs=-1)
@JSON
@click.option("--locked", is_flag=True, help="CI mode: fail if any artifact would differ from the lock; never rewrite it.")
@click.option("--skip-unavailable", is_flag=True, help="Record stages whose backend is missing here as skipped.")
@click.option("--force", is_flag=True, help="Re-run every stage even if up to date.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="If another run holds the output folder: wait for it, or fail at once (exit 4).")
@click.option("--cache", "cache_url", envvar="REIDBUILD_CACHE", metavar="URL",
              help="Shared build cache (file:///folder, s3://bucket/prefix, any fsspec URL); env REIDBUILD_CACHE.")
@click.option("--cache-required", is_flag=True, help="Exit 3 if the cache cannot be reached (default: warn, build here).")
@click.option("--cache-push/--no-cache-push", default=True, show_default=True,
              help="Push what this run built to the cache (--no-cache-push: only restore).")
@click.option("--jobs", "-j", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Build this many manifests at once, in local processes.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Run every stage as a Ray task on the cluster at ADDRESS (default: auto); needs --cache.")
@QUIET
@_guard
def apply(manifests: tuple[str, ...], as_json: bool, locked: bool, skip_unavailable: bool, force: bool, wait: bool,
          cache_url: str | None, cache_required: bool, cache_push: bool, jobs: int, ray_address: str | None,
          quiet: bool) -> None:
    """Run every stale stage, write artifacts and the lock, and prove parity.

    Several manifests (files, folders, globs) build as a fleet: one's failure does not stop the others, and
    the exit code is the worst one.
    """
    from . import fleet

    if ray_address is not None and (ray_address.endswith((".yml", ".yaml")) or Path(ray_address).exists()):
        manifests, ray_address = (ray_address, *manifests), "auto"  # `--ray m.yml`: a manifest, not an address
    if not manifests:
        raise click.UsageError("give at least one manifest (a file, a folder or a glob)")
    opts = fleet.ApplyOptions(locked=locked, skip_unavailable=skip_unavailable, force=force, wait=wait,
                              cache=cache_url or None, cache_required=cache_required, cache_push=cache_push)
    one = manifests[0]
    if len(manifests) > 1 or jobs > 1 or ray_address is not None or Path(one).is_dir() or any(c in one for c in "*?["):
        _apply_fleet(fleet.expand_manifests(list(manifests)), opts, as_json, jobs, ray_address)
        return
    from .console import EventPrinter
    from .provenance import public_url

    t0 = time.perf_counter()
    noopcache.forget(one)
    emit = EventPrinter(quiet, as_json)
    log = emit.log
    res = fleet.apply_manifest(Path(manifests[0]), opts, emit, on_wait=lambda msg: click.echo(msg, err=True))
    total = time.perf_counter() - t0
    if as_json:
        _emit_json({**res.to_dict(), "seconds": round(total, 3), "events": log})
    elif not res.ran and not res.failed and not res.restored:
        click.echo(noopcache.summary_line(len(res.cached), total))
    else:
        restored = f"{len(res.restored)} restored from cache, " if res.restored else ""
        click.echo(f"ran {len(res.ran)} stage(s), {restored}{len(res.cached)} up to date, "
                   f"{len(res.skipped)} skipped in {total:.1f} s; lock: {res.lock}")
        if res.restored:
            click.echo(f"restored from cache {public_url(cache_url)}: {', '.join(res.restored)} "
                       f"(each artifact's origin: {res.provenance or 'not recorded'})")
    report = _report_path(Path(res.lock))
    if report is not None and not as_json:
        click.echo(f"report: {report}")
    if locked and res.skipped:
        click.echo("skipped stages (not checked): " + ", ".join(res.skipped), err=True)
    if res.drift:
        raise CheckFailed("--locked: artifacts differ from the lock: " + ", ".join(res.drift))
    if res.failed:
        raise CheckFailed("; ".join(res.failed))
    replayable = not (as_json or locked or force or cache_url or res.ran or res.restored or res.skipped)
    noopcache.finish(replayable, len(res.cached), noopcache.summary_line(len(res.cached), total))


def _apply_fleet(paths: list[Path], opts: Any, as_json: bool, jobs: int, ray_address: str | None) -> None:
    """Build many manifests; print one summary line per manifest and exit with the worst code."""
    from . import fleet

    t0 = time.perf_counter()
    if ray_address is not None:
        from .raycluster import run_on_ray

        results = run_on_ray(paths, opts, _fleet_printer, ray_address)
    else:
        results = fleet.run_fleet(paths, opts, _fleet_printer, jobs=jobs)
    total = time.perf_counter() - t0
    if as_json:
        _emit_json({"manifests": [r.to_dict() for r in results], "seconds": round(total, 3),
                    "exit_code": fleet.worst(results)})
    else:
        for r in results:
            state = "ok" if r.exit_code == 0 else f"FAILED (exit {r.exit_code}): {r.message.splitlines()[0]}"
            click.echo(f"{r.manifest}: {state}; ran {len(r.ran)}, restored {len(r.restored)}, "
                       f"up to date {len(r.cached)}, skipped {len(r.skipped)}")
        ok = sum(r.exit_code == 0 for r in results)
        click.echo(f"{ok} of {len(results)} manifests ok in {total:.1f} s")
    code = fleet.worst(results)
    if code:
        sys.exit(code)


def _report_path(lock_path: Path) -> Path | None:
    """The HTML report this build wrote, if it has one (apply ends by naming it), relative to here if inside."""
    from . import lockfile

    lock = lockfile.read(lock_path)
    rec = lock.stages.get("report") if lock is not None else None
    if rec is None or rec.status != "ok":
        return None
    here = Path.cwd().resolve()
    for entry in rec.outputs.values():
        path = (lock_path.parent / entry["path"]).resolve()
        if path.is_file():
            shown: Path = path.relative_to(here) if path.is_relative_to(here) else path
            return shown
    return None


@main.command()
@MANIFEST
@JSON
@click.option("--rebuild", is_flag=True,
              help="Rebuild every stage in a scratch folder and classify each artifact: identical, equivalent "
                   "or different.")
@click.option("--cache", "cache_url", envvar="REIDBUILD_CACHE", metavar="URL",
              help="With --rebuild: audit the shared cache (its entries must hold what this rebuild made); "
                   "env REIDBUILD_CACHE.")
@click.option("--trust-cache", is_flag=True,
              help="With --rebuild and --cache: restore stages the cache holds instead of rebuilding them "
                   "(proves only that the cache holds what the lock names).")
@QUIET
@_guard
def verify(manifest: str, as_json: bool, rebuild: bool, cache_url: str | None, trust_cache: bool,
           quiet: bool) -> None:
    """Re-hash artifacts and inputs against the lock (exit 1 on any difference)."""
    from .manifest import load_manifest
    from .verify import verify_lock

    if trust_cache and not (rebuild and cache_url):
        raise click.UsageError("--trust-cache needs --rebuild and a cache (--cache URL or REIDBUILD_CACHE)")
    if rebuild:
        _verify_rebuild(manifest, as_json, quiet, cache_url or None, trust_cache)
        return
    lm = load_manifest(Path(manifest))
    report = verify_lock(lm)
    if as_json:
        _emit_json(report.to_dict())
    else:
        for line in report.lines():
            click.echo(line)
    if report.problems:
        raise CheckFailed(f"verify: {len(report.problems)} problem(s): " + "; ".join(report.problems[:5])
                          + (" ..." if len(report.problems) > 5 else ""))
    if not as_json:
        click.echo(f"verified {report.checked} files against {lm.lock_path.name}")


def _verify_rebuild(manifest: str, as_json: bool, quiet: bool, cache_url: str | None, trust_cache: bool) -> None:
    """Rebuild into a scratch folder; a cache is audited, or (``trust_cache``) restored from, never pushed to."""
    from .console import EventPrinter
    from .rebuild import rebuild

    lm, stages = _load(manifest)
    store = None
    if cache_url:
        from .cache import open_store

        store = open_store(cache_url, push=False)
    report = rebuild(lm, stages, EventPrinter(quiet, as_json), store=store, trust_cache=trust_cache)
    if as_json:
        _emit_json(report.to_dict())
    else:
        for line in report.lines():
            click.echo(line)
    first = report.first_different
    if first is not None:
        raise CheckFailed(f"verify --rebuild: stage {first.stage} is the first whose output differs: "
                          f"{first.file}: {first.detail}")
    if report.cache_mismatches:
        raise CheckFailed(f"verify --rebuild: the cache holds other bytes than this rebuild for "
                          f"{len(report.cache_mismatches)} stage(s): {report.cache_mismatches[0]}")
    if not as_json:
        click.echo(report.summary())


@main.command()
@MANIFEST
@click.option("--output", "out", type=click.Path(dir_okay=False),
              help="Where to write the page [default: <name>.report.html in the current folder].")
@_guard
def report(manifest: str, out: str | None) -> None:
    """Write the HTML parity report from the lock and the built artifacts (rebuilds nothing)."""
    from . import lockfile
    from .fsutil import atomic_write
    from .report import collect, render

    lm, stages = _load(manifest)
    lock = lockfile.read(lm.lock_path)
    if lock is None or not any(s.startswith("parity.") for s in lock.stages):
        raise CheckFailed(f"{lm.lock_path}: no parity results in the lock; run `reidbuild apply {lm.path.name}` first")
    target = Path(out) if out else Path.cwd() / f"{lm.model.name}.report.html"
    if target.resolve().parent == lm.output_dir and target.name in {f for s in lock.stages.values() for f in s.outputs}:
        raise InputError(f"{target}: is an artifact the lock records; choose another --output")
    data = collect(lm, lock, lm.output_dir, [s.name for s in stages], skip=("report",))
    atomic_write(target.resolve().parent, target.name, render(data).encode())
    click.echo(str(target))


@main.command()
@MANIFEST
@click.option("--backend", required=True, type=BackendChoice(),
              help="torch (the reference) or a runner of a declared target (reidbuild.targets).")
@click.option("--input", "pattern", required=True, help="Glob of images, e.g. 'imgs/*.jpg'.")
@click.option("--output", "out", required=True, type=click.Path(file_okay=False), help="Folder for the .npy files.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 1024))
@JSON
@QUIET
@_guard
def infer(manifest: str, backend: str, pattern: str, out: str, batch_size: int, as_json: bool, quiet: bool) -> None:
    """Compute features with one backend's built artifacts; one .npy per image in OUTPUT."""
    from .console import Progress
    from .infer import run_infer
    from .manifest import load_manifest

    lm = load_manifest(Path(manifest))
    progress = Progress.for_stderr(quiet, as_json)
    written = run_infer(lm, backend, pattern, Path(out), batch_size,
                        progress=lambda d, t: progress.update("infer", f"{backend} images", d, t))
    progress.finish()
    if as_json:
        _emit_json({"backend": backend, "written": [str(p) for p in written]})
    else:
        click.echo(f"wrote {len(written)} feature file(s) to {out}")


@main.group()
def cache() -> None:
    """Look after a shared build cache (for the people who run it)."""


CACHE_URL = click.option("--cache", "cache_url", envvar="REIDBUILD_CACHE", required=True, metavar="URL",
                         help="The cache (file:///folder, s3://bucket/prefix); env REIDBUILD_CACHE.")


@cache.command("ls")
@CACHE_URL
@JSON
@_guard
def cache_ls(cache_url: str, as_json: bool) -> None:
    """List the action entries: key, stage, files, size and when each was pushed."""
    from .cache import open_store

    store = open_store(cache_url, required=True, why_required="cache ls needs to read it")
    rows: list[dict[str, Any]] = [{"key": e.key, "stage": e.stage, "files": sorted(e.files), "bytes": e.size,
             "pushed": e.modified.isoformat(timespec="seconds")} for e in store.entries()]
    if as_json:
        _emit_json({"cache": cache_url, "entries": rows})
        return
    for r in sorted(rows, key=lambda r: (r["pushed"], r["stage"])):
        click.echo(f"{r['key'][:16]}  {r['pushed']}  {r['bytes']:>12,d} B  {r['stage']:<22} {', '.join(r['files'])}")
    click.echo(f"{len(rows)} entries, {sum(r['bytes'] for r in rows):,d} bytes referenced")


@cache.command("gc")
@CACHE_URL
@click.option("--keep-days", required=True, type=click.FloatRange(0), help="Drop entries pushed more than N days ago.")
@JSON
@_guard
def cache_gc(cache_url: str, keep_days: float, as_json: bool) -> None:
    """Drop old action entries, then the blobs no remaining entry names."""
    from .cache import open_store

    entries, blobs, freed = open_store(cache_url, required=True, why_required="cache gc needs it").gc(keep_days)
    if as_json:
        _emit_json({"cache": cache_url, "entries_removed": entries, "blobs_removed": blobs, "bytes_freed": freed})
    else:
        click.echo(f"removed {entries} entries and {blobs} blobs ({freed:,d} bytes)")


def entry() -> None:
    """The ``reidbuild`` command: ``main`` without the interpreter's teardown once it is done
    (``reidbuild.launch.exit_now``; tests call ``main`` itself)."""
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    launch.exit_now(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
