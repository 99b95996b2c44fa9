"""Gather what the report shows from a finished build: the lock, the parity feature files, the images.

Nothing here runs a model: per-image features come from the parity stages' ``.npz`` artifacts, checked
against the lock's sha256 before use (they are files on disk, so untrusted).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import featurefile, lockfile
from ..compare import nearest_neighbours
from ..fsutil import HashCache

PARITY_PREFIX = "parity."


@dataclass
class CheckData:
    """One parity check: its verdict, tolerances, lock facts and (when readable) the compared features."""

    name: str
    status: str  # ok | failed | skipped
    tolerance: dict[str, Any]
    record: dict[str, Any]
    images: list[str] = field(default_factory=list)
    reference: Optional[np.ndarray] = None
    actual: Optional[np.ndarray] = None
    suggested: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "ok"

    def neighbours(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k neighbour indices per query image, by the reference's and by the backend's features."""
        assert self.reference is not None and self.actual is not None
        return nearest_neighbours(self.reference, k), nearest_neighbours(self.actual, k)


@dataclass
class ReportData:
    name: str
    manifest: str
    source: dict[str, Any]
    targets: dict[str, Any]
    checks: list[CheckData]
    timeline: list[dict[str, Any]]
    artifacts: list[dict[str, Any]]
    environment: dict[str, Any]
    image_paths: dict[str, Path]
    input_size: tuple[int, int]  # height, width

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks if c.status != "skipped")

    def summary(self) -> dict[str, Any]:
        """The report's facts that depend only on the build's results (not on when or how fast it ran)."""
        return {"name": self.name, "passed": self.passed, "source": self.source, "targets": self.targets,
                "checks": [{"check": c.name, "status": c.status, "tolerance": c.tolerance,
                            "suggested": c.suggested, "result": {k: v for k, v in c.record.items() if k != "backend"}}
                           for c in self.checks],
                "artifacts": [{k: a[k] for k in ("file", "sha256")} for a in self.artifacts]}


def collect(lm: Any, lock: lockfile.Lock, output_dir: Path, order: list[str], cached: tuple[str, ...] = (),
            skip: tuple[str, ...] = ()) -> ReportData:
    """The report's data for manifest ``lm`` from ``lock`` and the artifacts in ``output_dir``.

    ``order`` is the build's stage order (the timeline); ``cached`` names stages found up to date in the run
    that writes the report; ``skip`` names stages whose records are left out (the report itself).
    """
    hashes = HashCache()
    stages = [s for s in order if s in lock.stages and s not in skip]
    checks = [_check(s, lock.stages[s], output_dir, hashes) for s in stages if s.startswith(PARITY_PREFIX)]
    load = lock.stages.get("load")
    source = {role: entry.get("path") for role, entry in (load.inputs if load else {}).items()}
    if load is not None and "weights" in load.inputs:
        source["weights sha256"] = load.inputs["weights"].get("sha256")
    elif load is not None and "weights" in load.params:  # seeded random weights: no checkpoint file
        source["weights"] = load.params["weights"]
    timeline = [{"stage": s, "seconds": lock.stages[s].seconds, "status": lock.stages[s].status,
                 "cached": s in cached} for s in stages]
    artifacts = [{"stage": s, "file": f, "size": e.get("size"), "sha256": e.get("sha256"),
                  "reproducible": e.get("reproducible", True)}
                 for s, f, e in lockfile.iter_artifacts(lock) if s not in skip]
    images = {p.name: p for p in (lm.images("parity", "images") if lm.model.parity else [])}
    return ReportData(lm.model.name, lm.path.name, source, lm.model.targets.model_dump(exclude_none=True),
                      checks, timeline, artifacts, _environment(lock, checks), images,
                      (lm.model.input.height, lm.model.input.width))


def _check(stage: str, rec: lockfile.StageRecord, output_dir: Path, hashes: HashCache) -> CheckData:
    tol = dict(rec.params.get("tolerance") or {})
    data = CheckData(stage[len(PARITY_PREFIX):], rec.status, tol, dict(rec.record))
    if rec.status == "skipped":
        data.note = str(rec.record.get("reason", "skipped"))
        return data
    for fname, entry in rec.outputs.items():
        path = output_dir / fname
        if not path.is_file() or hashes.file(path) != entry.get("sha256"):
            data.note = f"{fname} is missing or differs from the lock: per-image views left out"
            continue
        arrays = featurefile.load(path)
        data.reference, data.actual = arrays.get("reference"), arrays.get("actual")
        data.images = [str(x) for x in arrays.get("images", np.array([]))]
    if not data.passed:
        data.suggested = dict(rec.record.get("suggested") or {})  # the parity stage records them (compare.py)
    return data


def _environment(lock: lockfile.Lock, checks: list[CheckData]) -> dict[str, Any]:
    """Tool versions the build used, what each backend ran on, and TensorRT/GPU facts when there are any."""
    tools: dict[str, str] = {}
    for rec in lock.stages.values():
        tools.update(rec.tools)
    env: dict[str, Any] = {"tools": dict(sorted(tools.items())),
                           "runtimes": {c.name: c.record.get("backend") for c in checks if c.record.get("backend")},
                           "report written on": f"{platform.system()} {platform.machine()}, "
                                                f"Python {platform.python_version()}"}
    engine = lock.stages.get("tensorrt.engine")
    if engine is not None and engine.record.get("environment"):
        env["tensorrt"] = engine.record["environment"]
    return env
