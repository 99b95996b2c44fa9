"""The CPU int8 target: ``precision.int8_cpu`` from the final ONNX (uint8 activations, int32 biases: what
onnxruntime's CPU kernels fuse), proven as ``parity.onnx_int8_cpu`` and run by onnxruntime."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from ..manifest_parts import Calibration, Strict
from .base import Artifact, BackendBuild, Build, Target, section
from .onnx import ort_factory


class OnnxInt8CpuTarget(Strict):
    """The int8 ONNX onnxruntime's CPU kernels want (uint8 activations, int32 biases); not for TensorRT."""

    calibration: Calibration
    batch_size: int = Field(8, ge=1, le=4096, description="Calibration uses at most batches x batch_size images.")


def validate(manifest: Any) -> None:
    """Its images prove it: a parity section is required."""
    if section(manifest, "onnx_int8_cpu", OnnxInt8CpuTarget) is not None and manifest.parity is None:
        raise ValueError("targets.onnx_int8_cpu needs a parity section: its images prove the int8 ONNX")


def contribute(build: Build, target: OnnxInt8CpuTarget) -> None:
    """Quantise the final ONNX on the calibration images and prove it."""
    from ..stages import output_ref
    from ..stages.precision import int8_stage

    m = build.lm.model
    onnx = build.artifact("onnx")
    calib = build.lm.images("targets", "onnx_int8_cpu", "calibration", "images")
    st = build.add(int8_stage(target, onnx.ref, m.name, calib, m.input, adapt=onnx.adapter(m.input.color),
                              probe_paths=build.probe_paths, cpu=True))
    quantised = Artifact(output_ref(st), onnx.input_layout, onnx.output_transforms)
    build.runner("onnx_int8_cpu", BackendBuild([quantised.ref], ort_factory(quantised, m.input.color),
                                               output_transforms=list(onnx.output_transforms), precision="int8"))
    build.prove("onnx_int8_cpu")  # the manifest validator demands a parity section for this target


TARGET = Target("onnx_int8_cpu", OnnxInt8CpuTarget, contribute, backends={"onnx_int8_cpu": "int8"},
                validate=validate, description="an int8 ONNX for onnxruntime's CPU kernels")
