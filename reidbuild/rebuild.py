"""verify --rebuild: rebuild every stage into a scratch folder and compare with the locked artifacts.

Each artifact is **identical** (same bytes), **equivalent** (a stage declared non-reproducible, e.g. a
TensorRT engine or the HTML report, whose own equivalence test passes against the locked artifact) or
**different** (with the first differing tensor, line or byte). The rebuild runs the ordinary pipeline with
``force`` into a temporary folder outside the output folder, from a copy of the lock, so nothing the user
owns is written. Stages this machine cannot run are reported as not rebuilt (not a failure).

A shared cache is not trusted by default: it is **audited** (each action entry for a stage rebuilt here must
name the bytes the rebuild made; anything else was planted, or built by something the key does not cover).
With ``trust_cache`` the rebuild restores what the cache holds: such an artifact is **restored**, which proves
only that the cache holds the bytes the lock names for that fingerprint, not that they rebuild.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import lockfile, pipeline
from .errors import CheckFailed
from .fsutil import HashCache

IDENTICAL, EQUIVALENT, DIFFERENT, NOT_REBUILT = "identical", "equivalent", "different", "not rebuilt"
RESTORED = "restored"  # taken from a trusted cache: matches the lock, but was not rebuilt here
KINDS = (IDENTICAL, EQUIVALENT, RESTORED, DIFFERENT, NOT_REBUILT)


@dataclass
class Verdict:
    stage: str
    file: str
    verdict: str
    detail: str = ""


@dataclass
class RebuildReport:
    verdicts: list[Verdict] = field(default_factory=list)
    cache_checked: int = 0  # stages rebuilt here whose cache entry was compared with the rebuild
    cache_mismatches: list[str] = field(default_factory=list)  # entries holding other bytes than the rebuild

    @property
    def first_different(self) -> Optional[Verdict]:
        return next((v for v in self.verdicts if v.verdict == DIFFERENT), None)

    @property
    def ok(self) -> bool:
        return self.first_different is None and not self.cache_mismatches

    def count(self, kind: str) -> int:
        return sum(v.verdict == kind for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_different
        return {"ok": self.ok, "artifacts": [asdict(v) for v in self.verdicts],
                "first_different_stage": first.stage if first else None,
                "counts": {k: self.count(k) for k in KINDS},
                "cache_audit": {"checked": self.cache_checked, "mismatches": self.cache_mismatches}}

    def lines(self) -> list[str]:
        return ([f"{v.verdict:<11} {v.stage:<20} {v.file}" + (f"  ({v.detail})" if v.detail else "")
                 for v in self.verdicts] + [f"CACHE MISMATCH {m}" for m in self.cache_mismatches])

    def summary(self) -> str:
        """The closing line: what was reproduced here, and what only came from the cache."""
        text = (f"verify --rebuild: {self.count(IDENTICAL) + self.count(EQUIVALENT)} artifact(s) reproduced "
                "(identical or equivalent)")
        if self.count(RESTORED):
            text += (f", {self.count(RESTORED)} restored from the cache (not rebuilt: this shows only that the "
                     "cache holds what the lock names)")
        if self.cache_checked:
            text += f"; the cache agrees for all {self.cache_checked} stage(s) it holds"
        return text


def rebuild(lm: Any, stages: list[pipeline.Stage], emit: Callable[[pipeline.Event], None],
            store: Optional[Any] = None, trust_cache: bool = False) -> RebuildReport:
    """Rebuild ``stages`` of manifest ``lm`` into a scratch folder and classify every locked artifact.

    ``store`` (a ``reidbuild.cache.Store`` opened without push) is audited, or restored from with
    ``trust_cache``."""
    lock = lockfile.read(lm.lock_path)
    if lock is None:
        raise CheckFailed(f"{lm.lock_path}: no lock file; run `reidbuild apply {lm.path.name}` first")
    with tempfile.TemporaryDirectory(prefix="reidbuild-rebuild-") as tmp:
        scratch_lock = Path(tmp) / lm.lock_path.name
        shutil.copyfile(lm.lock_path, scratch_lock)
        scratch = Path(tmp) / "out"
        # trusting the cache: every stage is stale in the empty scratch folder, so no --force (which never restores)
        outcome = pipeline.run(stages, lock_path=scratch_lock, manifest_entry=lock.manifest, output_dir=scratch,
                               base=lm.base, emit=emit, skip_unavailable=True, force=not trust_cache,
                               store=store if trust_cache else None)
        report = classify(stages, lock, outcome.lock, lm.output_dir, scratch, restored=set(outcome.restored))
    if store is not None:
        audit_cache(report, [s for s in stages if s.name in outcome.ran], outcome.lock, store, emit)
    return report


def audit_cache(report: RebuildReport, rebuilt: list[pipeline.Stage], lock: lockfile.Lock, store: Any,
                emit: Callable[[pipeline.Event], None]) -> None:
    """Compare the cache's entry for each reproducible stage rebuilt here with the rebuild's own bytes.

    This is what the integrity check on blobs cannot do: an entry pushed by someone who could write to the
    cache names blobs that are intact but are not what this fingerprint builds."""
    for stage in rebuilt:
        rec = lock.stages.get(stage.name)
        if not stage.reproducible or rec is None or rec.status != "ok":
            continue
        key = store.action_key(stage, rec.fingerprint)
        entry = store.read_entry(key, emit) if key is not None else None
        if entry is None:
            continue
        report.cache_checked += 1
        held = {f: e.get("sha256") if isinstance(e, dict) else None for f, e in entry["outputs"].items()}
        made = {f: e["sha256"] for f, e in rec.outputs.items()}
        for fname in sorted(set(held) | set(made)):
            if held.get(fname) != made.get(fname):
                report.cache_mismatches.append(
                    f"stage {stage.name}: {fname}: the cache's entry {key[:12]} names "
                    f"{str(held.get(fname))[:12]}, this rebuild made {str(made.get(fname))[:12]} (planted, or "
                    "built with something the key does not cover)")


def classify(stages: list[pipeline.Stage], lock: lockfile.Lock, rebuilt: lockfile.Lock, out_dir: Path,
             scratch: Path, restored: frozenset[str] | set[str] = frozenset()) -> RebuildReport:
    """One verdict per artifact of every stage, in build order (``restored``: stages taken from the cache)."""
    report = RebuildReport()
    hashes = HashCache()
    for stage in stages:
        old, new = lock.stages.get(stage.name), rebuilt.stages.get(stage.name)
        files = list(stage.outputs) or ["(no artifact)"]
        if old is None:
            report.verdicts += [Verdict(stage.name, f, DIFFERENT, "stage is not in the lock") for f in files]
            continue
        if new is None or new.status == "skipped":
            why = (new.record.get("reason") if new else None) or "not run"
            report.verdicts += [Verdict(stage.name, f, NOT_REBUILT, str(why)) for f in files]
            continue
        stage_why = _stage_mismatch(old, new)
        equivalence: dict[str, Optional[str]] = {}
        for fname in stage.outputs:
            v = _artifact_verdict(stage, fname, old, out_dir, scratch, hashes, equivalence)
            if stage_why and v.verdict != DIFFERENT:
                v = Verdict(stage.name, fname, DIFFERENT, stage_why + (f"; bytes {v.verdict}" if v.verdict else ""))
            elif stage.name in restored and v.verdict != DIFFERENT:
                v = Verdict(stage.name, fname, RESTORED, "from the cache, not rebuilt: the cache holds the locked bytes")
            report.verdicts.append(v)
        if not stage.outputs and stage_why:
            report.verdicts.append(Verdict(stage.name, files[0], DIFFERENT, stage_why))
    return report


def _stage_mismatch(old: lockfile.StageRecord, new: lockfile.StageRecord) -> str:
    """Why the rebuild is not the build the lock records (other tools, inputs or parameters), or ''."""
    drift = [f"{t} {old.tools.get(t)} in the lock, {new.tools.get(t)} here" for t in sorted(set(old.tools) | set(new.tools))
             if old.tools.get(t) != new.tools.get(t)]
    if drift:
        return "tool versions differ: " + ", ".join(drift)
    if old.fingerprint != new.fingerprint:
        return "fingerprint differs from the lock (inputs, parameters or upstream artifacts changed)"
    if old.status != new.status:
        return f"recorded as {old.status} in the lock, {new.status} when rebuilt"
    return ""


def _artifact_verdict(stage: pipeline.Stage, fname: str, old: lockfile.StageRecord, out_dir: Path, scratch: Path,
                      hashes: HashCache, equivalence: dict[str, Optional[str]]) -> Verdict:
    locked, fresh = out_dir / fname, scratch / fname
    entry = old.outputs.get(fname)
    if entry is None:
        return Verdict(stage.name, fname, DIFFERENT, "not in the lock")
    if locked.is_symlink() or not locked.is_file() or hashes.file(locked) != entry.get("sha256"):
        return Verdict(stage.name, fname, DIFFERENT, "the output folder's file is missing or differs from the lock")
    if hashes.file(fresh) == entry.get("sha256"):
        return Verdict(stage.name, fname, IDENTICAL)
    if not stage.reproducible:
        if stage.equivalent is None:
            return Verdict(stage.name, fname, DIFFERENT, "bytes differ and the stage has no equivalence test")
        if "why" not in equivalence:
            equivalence["why"] = stage.equivalent(out_dir, scratch)
        why = equivalence["why"]
        return Verdict(stage.name, fname, EQUIVALENT if why is None else DIFFERENT,
                       "bytes differ (not byte-reproducible); its equivalence test passed" if why is None else why)
    return Verdict(stage.name, fname, DIFFERENT, first_difference(locked, fresh))


def first_difference(a: Path, b: Path) -> str:
    """Where two versions of an artifact first differ: a tensor for .onnx/.npz, a line for text, else a byte."""
    if a.suffix == ".npz":
        from . import featurefile

        return _first_array_difference(featurefile.load(a), featurefile.load(b))
    if a.suffix == ".onnx":
        found = _first_onnx_difference(a, b)
        if found:
            return found
    if a.suffix in (".prototxt", ".html", ".txt", ".json", ".yml", ".yaml"):
        la, lb = a.read_text(errors="replace").splitlines(), b.read_text(errors="replace").splitlines()
        for i, (x, y) in enumerate(zip(la, lb)):
            if x != y:
                return f"first differing line {i + 1}: {x[:60]!r} vs {y[:60]!r}"
        return f"{len(la)} vs {len(lb)} lines"
    da, db = a.read_bytes(), b.read_bytes()
    i = next((i for i, (x, y) in enumerate(zip(da, db)) if x != y), min(len(da), len(db)))
    return f"first differing byte at offset {i} (sizes {len(da)} and {len(db)})"


def _first_array_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    import numpy as np

    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if x is None or y is None:
            return f"array {name} only in one file"
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"array {name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        ne = np.argwhere(x != y)
        if len(ne):
            idx = tuple(int(i) for i in ne[0])
            return f"array {name}: first difference at {list(idx)}: {x[idx]!r} vs {y[idx]!r} ({len(ne)} differ)"
    return "arrays equal; the files differ in their container bytes"


def _first_onnx_difference(a: Path, b: Path) -> Optional[str]:
    """The first initializer (tensor) or node that differs, None if the graphs' tensors and nodes are equal."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    try:
        ma, mb = onnx.load(str(a)), onnx.load(str(b))
    except Exception:  # noqa: BLE001 - not a readable model: fall back to bytes
        return None
    ia = {t.name: t for t in ma.graph.initializer}
    ib = {t.name: t for t in mb.graph.initializer}
    for name in list(ia) + [n for n in ib if n not in ia]:
        if name not in ia or name not in ib:
            return f"tensor {name} only in one model"
        x, y = numpy_helper.to_array(ia[name]), numpy_helper.to_array(ib[name])
        if x.shape != y.shape or not np.array_equal(x, y):
            where = np.argwhere(x != y)[0].tolist() if x.shape == y.shape else f"shape {x.shape} vs {y.shape}"
            return f"tensor {name} differs (first at {where})"
    for i, (na, nb) in enumerate(zip(ma.graph.node, mb.graph.node)):
        if na != nb:
            return f"node #{i} differs: {na.op_type} {na.name!r} vs {nb.op_type} {nb.name!r}"
    if len(ma.graph.node) != len(mb.graph.node):
        return f"{len(ma.graph.node)} vs {len(mb.graph.node)} nodes"
    return None


def runner_equivalence(factory: Callable[[Callable[[str], Path]], Any], images: list[Path], inp: Any,
                       tol: dict[str, Any]) -> Callable[[Path, Path], Optional[str]]:
    """An equivalence test for a non-reproducible backend artifact: the rebuilt one's features on the parity
    images must pass ``tol`` against the locked one's."""
    def check(locked: Path, rebuilt: Path) -> Optional[str]:
        from .backends.base import run_batched
        from .compare import compare
        from .images import load_images

        batch = load_images(images, inp.height, inp.width, inp.color, inp.interpolation)
        with factory(lambda f: locked / f) as runner:
            ref = run_batched(runner, batch, 8)
        with factory(lambda f: rebuilt / f) as runner:
            got = run_batched(runner, batch, 8)
        result = compare(ref, got, tol)
        return None if result.passed else "outputs differ from the locked artifact's: " + "; ".join(result.failures)
    return check
