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
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads wreck latency on small machines
os.environ.setdefault("GLOG_minloglevel", "2")  # keep pycaffe quiet

import click

from .errors import CheckFailed, InputError, ReidbuildError

EXIT_OK, EXIT_IO, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 6, 70, 130


def _fail(exc: BaseException) -> NoReturn:
    if isinstance(exc, ReidbuildError):
        first, _, rest = exc.message.partition("\n")
        click.echo(f"error: {first}", err=True)
        if rest:
            click.echo(rest, err=True)
        sys.exit(exc.exit_code)
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename or "file system"
        click.echo(f"error: {where}: {exc.strerror} (nothing half-written was kept)", err=True)
        sys.exit(EXIT_IO)
    if isinstance(exc, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if os.environ.get("REIDBUILD_DEBUG"):
        raise exc
    click.echo(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
               "(a bug in reidbuild; set REIDBUILD_DEBUG=1 for a traceback)", err=True)
    sys.exit(EXIT_INTERNAL)


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


def _load(manifest: str):
    from .manifest import load_manifest
    from .stages.assemble import assemble

    lm = load_manifest(Path(manifest))
    return lm, assemble(lm).stages


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


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
    from .fsutil import HashCache
    from .pipeline import Planner

    lm, stages = _load(manifest)
    planner = Planner(stages, lockfile.read(lm.lock_path), lm.output_dir, lm.base, HashCache())
    plans = planner.plan()
    unavailable = {s.name: s.available() for s in stages if s.available}
    rows = [{"stage": p.stage.name, "stale": p.stale, "reasons": p.reasons, "outputs": list(p.stage.outputs),
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


@main.command()
@MANIFEST
@JSON
@click.option("--locked", is_flag=True, help="CI mode: fail if any artifact would differ from the lock; never rewrite it.")
@click.option("--skip-unavailable", is_flag=True, help="Record stages whose backend is missing here as skipped.")
@click.option("--force", is_flag=True, help="Re-run every stage even if up to date.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="If another run holds the output folder: wait for it, or fail at once (exit 4).")
@QUIET
@_guard
def apply(manifest: str, as_json: bool, locked: bool, skip_unavailable: bool, force: bool, wait: bool,
          quiet: bool) -> None:
    """Run every stale stage, write artifacts and the lock, and prove parity."""
    from . import pipeline
    from .console import EventPrinter
    from .fsutil import ensure_dir, run_lock

    t0 = time.perf_counter()
    lm, stages = _load(manifest)
    out_dir = ensure_dir(lm.output_dir)
    emit = EventPrinter(quiet, as_json)
    log = emit.log

    with run_lock(out_dir, wait, on_wait=lambda msg: click.echo(msg, err=True)):
        outcome = pipeline.run(stages, lock_path=lm.lock_path, output_dir=out_dir, base=lm.base, emit=emit,
                               manifest_entry={"path": lm.path.name, "sha256": lm.sha256},
                               locked=locked, skip_unavailable=skip_unavailable, force=force)
    total = time.perf_counter() - t0
    if as_json:
        _emit_json({"manifest": str(lm.path), "lock": str(lm.lock_path), "ran": outcome.ran, "cached": outcome.cached,
                    "skipped": outcome.skipped, "failed": outcome.failed, "drift": outcome.drift,
                    "timings": {k: round(v, 3) for k, v in outcome.timings.items()}, "seconds": round(total, 3),
                    "events": log})
    elif not outcome.ran and not outcome.failed:
        click.echo(f"nothing to do: all {len(outcome.cached)} stages up to date ({total:.1f} s)")
    else:
        click.echo(f"ran {len(outcome.ran)} stage(s), {len(outcome.cached)} up to date, "
                   f"{len(outcome.skipped)} skipped in {total:.1f} s; lock: {lm.lock_path}")
    report = _report_path(lm, outcome.lock)
    if report is not None and not as_json:
        click.echo(f"report: {report}")
    if locked and outcome.skipped:
        click.echo("skipped stages (not checked): " + ", ".join(outcome.skipped), err=True)
    if outcome.drift:
        raise CheckFailed("--locked: artifacts differ from the lock: " + ", ".join(outcome.drift))
    if outcome.failed:
        raise CheckFailed("; ".join(outcome.failed))


def _report_path(lm: Any, lock: Any) -> Path | None:
    """The HTML report this build wrote, if it has one (apply ends by naming it)."""
    rec = lock.stages.get("report")
    if rec is None or rec.status != "ok":
        return None
    path = next((lm.output_dir / f for f in rec.outputs if (lm.output_dir / f).is_file()), None)
    if path is not None and path.is_relative_to(Path.cwd().resolve()):
        return path.relative_to(Path.cwd().resolve())
    return path


@main.command()
@MANIFEST
@JSON
@click.option("--rebuild", is_flag=True,
              help="Rebuild every stage in a scratch folder and classify each artifact: identical, equivalent "
                   "or different.")
@QUIET
@_guard
def verify(manifest: str, as_json: bool, rebuild: bool, quiet: bool) -> None:
    """Re-hash artifacts and inputs against the lock (exit 1 on any difference)."""
    from .manifest import load_manifest
    from .verify import verify_lock

    if rebuild:
        _verify_rebuild(manifest, as_json, quiet)
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


def _verify_rebuild(manifest: str, as_json: bool, quiet: bool) -> None:
    from .console import EventPrinter
    from .rebuild import rebuild

    lm, stages = _load(manifest)
    report = rebuild(lm, stages, EventPrinter(quiet, as_json))
    if as_json:
        _emit_json(report.to_dict())
    else:
        for line in report.lines():
            click.echo(line)
    first = report.first_different
    if first is not None:
        raise CheckFailed(f"verify --rebuild: stage {first.stage} is the first whose output differs: "
                          f"{first.file}: {first.detail}")
    if not as_json:
        click.echo(f"verify --rebuild: {len(report.verdicts)} artifact(s) reproduced (identical or equivalent)")


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
    with tempfile.TemporaryDirectory(prefix="reidbuild-report-") as scratch:
        page = render(data, Path(scratch))
    atomic_write(target.resolve().parent, target.name, page.encode())
    click.echo(str(target))


@main.command()
@MANIFEST
@click.option("--backend", required=True,
              type=click.Choice(["torch", "onnxruntime", "caffe", "tensorrt", "onnx_fp16", "onnx_int8"]))
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


if __name__ == "__main__":  # pragma: no cover
    main()
