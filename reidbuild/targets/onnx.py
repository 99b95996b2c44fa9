"""The ONNX target (always built): ``onnx.export`` -> [``onnx.simplify``] -> [``onnx.patch``], run by onnxruntime.

Provides two artifact roles to the targets after it: ``onnx`` (the final ``<name>.onnx``, after the
ONNX-only graph patches) and ``onnx.graph`` (the simplified graph before them: the Caffe converter's source).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import Field

from ..manifest_parts import Strict
from .base import Artifact, BackendBuild, Build, RunnerFactory, Target, patch_files, section

if TYPE_CHECKING:
    from ..backends.base import Runner


class OnnxTarget(Strict):
    opset: int = Field(default=17, ge=11, le=17, description="TorchScript exporter opsets (reproducible bytes).")
    simplify: bool = True
    dynamic_batch: bool = True
    patches: list[str] = Field(default_factory=list, description="Graph patch files applied in order.")


def onnx_target(manifest: Any) -> OnnxTarget:
    """The manifest's ``targets.onnx`` section (always present: defaults when not written)."""
    t = section(manifest, "onnx", OnnxTarget)
    assert t is not None  # always=True: the manifest model gives it a default
    return t


def ort_factory(art: Artifact, color: str) -> RunnerFactory:
    """onnxruntime on ``art``'s file, fed as its graph input wants (graph patches may change it)."""
    adapt = art.adapter(color)

    def make(resolve: Callable[[str], Path]) -> Runner:
        from ..backends.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(resolve(art.ref.file), adapt=adapt)
    return make


def contribute(build: Build, target: OnnxTarget) -> None:
    """Export, simplify and patch; the last ONNX stage writes ``<name>.onnx``."""
    from ..stages import output_ref
    from ..stages.onnx import export_stage, simplify_stage

    lm = build.lm
    m = lm.model
    name = m.name
    onnx_patches = patch_files(lm, target.patches, "onnx")
    chain = ["export"] + (["simplify"] if target.simplify else []) + (["patch"] if onnx_patches else [])
    files = {"export": f"{name}.export.onnx", "simplify": f"{name}.sim.onnx", "patch": f"{name}.onnx"}
    files[chain[-1]] = f"{name}.onnx"
    ref = output_ref(build.add(export_stage(lm, build.source, build.load, files["export"], build.probe_paths)))
    if target.simplify:
        ref = output_ref(build.add(simplify_stage(lm, ref, files["simplify"], build.probe_paths)))
    build.provide("onnx.graph", Artifact(ref))  # the single source for Caffe: before ONNX-only patches
    final = Artifact(ref)
    if onnx_patches:
        from ..patches import input_layout, output_transforms
        from ..stages.patch import patch_stage

        st = build.add(patch_stage("onnx", onnx_patches, [ref], [files["patch"]], name, dialect=None,
                                   check_input_shape=(1, 3, m.input.height, m.input.width), probe_input=m.input,
                                   probe_paths=build.probe_paths))
        final = Artifact(output_ref(st), input_layout(onnx_patches), tuple(output_transforms(onnx_patches)))
    build.provide("onnx", final)
    build.runner("onnxruntime", BackendBuild([final.ref], ort_factory(final, m.input.color),
                                             output_transforms=list(final.output_transforms)))


TARGET = Target("onnx", OnnxTarget, contribute, backends={"onnxruntime": "fp32"}, requestable=("onnxruntime",),
                always=True, description="the ONNX model (onnxruntime)")
