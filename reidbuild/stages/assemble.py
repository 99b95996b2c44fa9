"""Turn a validated manifest into the ordered list of stages (the plan's skeleton) and the backend runners.

load -> every registered target's stages, in registration order (``reidbuild.targets``: onnx, caffe,
tensorrt's precision ONNX and its CPU proof, onnx_int8_cpu, ...) -> parity.<backend> for ``parity.backends``
-> the late stages (the TensorRT engine) -> the parity checks of late backends -> report.

The same runner factories serve parity (inside a run) and ``infer`` (on committed artifacts), so both
feed each backend exactly the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import targets
from ..manifest import LoadedManifest
from ..pipeline import Stage
from ..probe import PROBE_COUNT
from ..sources import open_source
from ..targets import BackendBuild, Build, RunnerFactory
from .load import load_stage

__all__ = ["Assembly", "BackendBuild", "RunnerFactory", "assemble"]


@dataclass
class Assembly:
    stages: list[Stage]
    backends: dict[str, BackendBuild]  # runner name (onnxruntime, caffe, onnx_fp16, tensorrt, ...) -> how to run it


def assemble(lm: LoadedManifest) -> Assembly:
    """Every declared target contributes its stages; requested parity checks run before late stages unless
    they need one (every check this machine can do runs before the engine, which may be unavailable: exit 3)."""
    m = lm.model
    images: Optional[list[Path]] = lm.images("parity", "images") if m.parity else None
    # the self-checks of load and every ONNX-writing stage run on the first parity images (person-like without)
    probe_paths = images[:PROBE_COUNT] if images else None
    source = open_source(lm)
    load, load_ref = load_stage(lm, source, probe_paths)
    build = Build(lm, source, load_ref, images, probe_paths, stages=[load])
    for target in targets.registered():
        section = getattr(m.targets, target.name, None)
        if section is not None:
            target.contribute(build, section)
    wanted = list(m.parity.backends) if m.parity is not None and images is not None else []
    late_stages = {s.name for s in build.late}
    late = [b for b in wanted if any(a.stage in late_stages for a in build.backends[b].artifacts)]
    for b in wanted:
        if b not in late:
            build.prove(b)
    build.stages.extend(build.late)
    for b in late:
        build.prove(b)
    checks = [s.name for s in build.stages if s.name.startswith("parity.")]
    if checks and images:
        from .report import report_stage

        build.stages.append(report_stage(lm, checks, [s.name for s in build.stages] + ["report"], images))
    return Assembly(build.stages, build.backends)
