"""The TensorRT target: for fp16/int8 first the reduced-precision ONNX (``precision.fp16|int8``, proven on the
CPU as ``parity.onnx_<mode>``), then ``tensorrt.engine`` from it (a late stage: it needs a GPU), run by
``reidbuild.backends.tensorrt``."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

from pydantic import Field, model_validator

from ..manifest_parts import Calibration, Strict
from .base import Artifact, BackendBuild, Build, RunnerFactory, Target, section
from .onnx import onnx_target, ort_factory

if TYPE_CHECKING:
    from ..backends.base import Runner
    from ..stages import ArtifactRef


class TensorRTTarget(Strict):
    mode: Literal["fp32", "fp16", "int8"]
    batch_size: int = Field(ge=1, le=4096)
    height: Optional[int] = Field(None, ge=8, le=4096)
    width: Optional[int] = Field(None, ge=8, le=4096)
    workspace_mib: int = Field(1024, ge=16, le=1 << 20)
    calibration: Optional[Calibration] = None
    gpu: Optional[str] = Field(None, min_length=1, max_length=200, description=(
        "GPU model the engine is built for in fleet builds (`apply --ray`), e.g. \"NVIDIA A10\": the engine "
        "stage runs only on a Ray node advertising this name as a custom resource. Not part of the fingerprint."))

    @model_validator(mode="after")
    def _int8_needs_calibration(self) -> "TensorRTTarget":
        if self.mode == "int8" and self.calibration is None:
            raise ValueError("mode int8 needs a calibration section (images, batches)")
        return self


def validate(manifest: Any) -> None:
    """The engine's input agrees with the manifest's, reduced precision is proven first, batches fit the ONNX."""
    trt = section(manifest, "tensorrt", TensorRTTarget)
    if trt is None:
        return
    for dim in ("height", "width"):
        v = getattr(trt, dim)
        if v is not None and v != getattr(manifest.input, dim):
            raise ValueError(
                f"targets.tensorrt.{dim} is {v} but input.{dim} is {getattr(manifest.input, dim)}; they must agree"
            )
    if trt.mode != "fp32" and manifest.parity is None:
        raise ValueError(f"targets.tensorrt mode {trt.mode} needs a parity section: its images prove the "
                         f"{trt.mode} ONNX on the CPU before an engine is built")
    if not onnx_target(manifest).dynamic_batch and trt.batch_size != 1:
        raise ValueError("targets.tensorrt.batch_size > 1 needs targets.onnx.dynamic_batch: true")


def trt_runner(engine: ArtifactRef, adapt: Callable[[Any], Any]) -> RunnerFactory:
    """The runner factory for an engine file fed like the ONNX it was built from."""
    def make(resolve: Callable[[str], Path]) -> Runner:
        from ..backends import tensorrt as trt_backend

        return trt_backend.TensorRTRunner(resolve(engine.file), adapt=adapt)
    return make


def contribute(build: Build, target: TensorRTTarget) -> None:
    """[precision ONNX + its CPU parity] now; the engine as a late stage (it may be unavailable here)."""
    from ..backends import tensorrt as trt_backend
    from ..stages import output_ref
    from ..stages.precision import precision_stage
    from ..stages.tensorrt import engine_stage

    lm = build.lm
    m = lm.model
    onnx = build.artifact("onnx")
    transforms = list(onnx.output_transforms)
    calib = lm.images("targets", "tensorrt", "calibration", "images") if target.calibration else []
    made = precision_stage(target, onnx.ref, m.name, calib, m.input, adapt=onnx.adapter(m.input.color),
                           probe_paths=build.probe_paths)
    source = onnx.ref
    if made is not None:
        source = output_ref(build.add(made))
        key = f"onnx_{target.mode}"
        precise = Artifact(source, onnx.input_layout, onnx.output_transforms)
        build.runner(key, BackendBuild([source], ort_factory(precise, m.input.color), output_transforms=transforms,
                                       precision=target.mode))
        build.prove(key)  # the reduced-precision ONNX is proven on the CPU before any engine is built
    engine = build.add(engine_stage(target, source, m.name), late=True)
    engine_ref = output_ref(engine, 0)
    runner = BackendBuild([engine_ref], trt_runner(engine_ref, onnx.adapter(m.input.color)),
                          available=trt_backend.available, output_transforms=transforms, precision=target.mode)
    build.runner("tensorrt", runner)
    if build.images:
        from ..rebuild import runner_equivalence

        engine.equivalent = runner_equivalence(runner.factory, build.images, m.input, build.profile(target.mode))


TARGET = Target("tensorrt", TensorRTTarget, contribute,
                backends={"tensorrt": "fp32", "onnx_fp16": "fp16", "onnx_int8": "int8"}, requestable=("tensorrt",),
                validate=validate, description="a TensorRT engine (fp32, or fp16/int8 from a proven ONNX)")
