"""Precision stages: the fp16 or int8 ONNX a TensorRT engine is built from (fp32 needs none), and the
CPU int8 ONNX (``targets.onnx_int8_cpu``) for onnxruntime.

``precision.fp16`` converts the final ONNX with onnxconverter-common; ``precision.int8`` calibrates on the
manifest's calibration images (at most ``batches`` x ``batch_size``, preprocessed exactly like parity) and
writes Q/DQ with onnxruntime. The calibration images are the stage's inputs, so changing, adding or
removing one re-runs the calibration; the record keeps the method, the images' digest and the scales' digest.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

if TYPE_CHECKING:  # numpy is imported where it is used: planning (a no-op apply) never needs it
    import numpy as np

    from ..selfcheck import Adapt

from ..errors import ImageError
from ..manifest import Input
from ..pipeline import Stage, StageContext, StageResult
from ..targets.onnx_int8_cpu import OnnxInt8CpuTarget
from ..targets.tensorrt import TensorRTTarget
from . import ArtifactRef, probe_for

TOOLS = ("onnx", "onnxruntime", "onnxconverter-common")


def smoke_test(ctx: StageContext, data: bytes, source: bytes, inp: Input, what: str,
               probe_paths: Optional[Sequence[Path]], adapt: Optional[Adapt] = None) -> dict[str, Any]:
    """The reduced-precision ONNX loads in onnxruntime and is finite on the self-check images wherever the
    fp32 ONNX it came from is; returns the lock's record of the check."""
    from .. import selfcheck

    probe = probe_for(ctx, inp, probe_paths)
    out = selfcheck.features(data, probe.images, what, adapt)
    notes = selfcheck.judge_finite(out, probe, what, lambda: selfcheck.features(source, probe.images, what, adapt),
                                   "the fp32 ONNX")
    for note in notes:
        ctx.log(note)
    rec: dict[str, Any] = probe.describe()
    if notes:
        rec["model_nonfinite"] = notes
    return rec


class LazyImages:
    """Calibration images loaded slice by slice (len() and slicing only), preprocessed exactly like parity."""

    def __init__(self, paths: list[Path], inp: Input) -> None:
        self.paths, self.inp = list(paths), inp

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: slice) -> np.ndarray:
        from ..images import load_images

        i = self.inp
        return load_images(self.paths[index], i.height, i.width, i.color, i.interpolation)


def calibration_inputs(target: Union[TensorRTTarget, OnnxInt8CpuTarget], calib_paths: list[Path],
                       key: str = "targets.tensorrt") -> list[Path]:
    """The images calibration uses: the glob's sorted matches, at most ``batches`` x ``batch_size``."""
    cal = target.calibration
    if cal is None:
        raise ImageError(f"{key}.calibration is required for mode int8")
    limit = cal.batches * target.batch_size
    paths = list(calib_paths)[:limit]
    if not paths:
        raise ImageError(f"{key}.calibration.images: glob {cal.images!r} matches no file")
    return paths


def precision_stage(target: TensorRTTarget, source: ArtifactRef, name: str, calib_paths: list[Path],
                    input: Input,  # the manifest's name
                    adapt: Optional[Adapt] = None,
                    probe_paths: Optional[Sequence[Path]] = None) -> Optional[Stage]:
    """The stage that writes ``<name>.fp16.onnx`` / ``<name>.int8.onnx`` from ``source``; None for fp32.
    ``probe_paths``: the self-check images (the first parity images; person-like images when None)."""
    mode = target.mode
    if mode == "fp32":
        return None
    out = f"{name}.{mode}.onnx"
    if mode == "int8":
        return int8_stage(target, source, name, calib_paths, input, adapt, probe_paths)
    from ..precision import fp16

    def run_fp16(ctx: StageContext) -> StageResult:
        src = ctx.artifact(source.file).read_bytes()
        data, record = fp16.convert_fp16(src)
        record["check"] = smoke_test(ctx, data, src, input, out, probe_paths, adapt)
        return StageResult({out: data}, record)

    stage = Stage(f"precision.{mode}", run_fp16,
                  params={"mode": mode, "recipe": fp16.RECIPE, "keep_fp32_ops": list(fp16.KEEP_FP32_OPS)},
                  deps=(source.stage,), outputs=(out,), tools=TOOLS,
                  description="convert the ONNX to fp16 (float32 I/O, sensitive ops kept in fp32)")
    return stage


def int8_stage(target: Union[TensorRTTarget, OnnxInt8CpuTarget], source: ArtifactRef, name: str,
               calib_paths: list[Path], input: Input,  # the manifest's name
               adapt: Optional[Adapt] = None, probe_paths: Optional[Sequence[Path]] = None,
               cpu: bool = False) -> Stage:
    """``precision.int8`` (``<name>.int8.onnx``, symmetric Q/DQ for TensorRT) or, with ``cpu``,
    ``precision.int8_cpu`` (``<name>.int8_cpu.onnx``, uint8 activations and int32 biases: the graph
    onnxruntime's CPU kernels fuse into QLinearConv). One calibration recipe serves both."""
    from ..precision import int8

    kind = "int8_cpu" if cpu else "int8"
    key = "targets.onnx_int8_cpu" if cpu else "targets.tensorrt"
    out = f"{name}.{kind}.onnx"
    cal = target.calibration
    assert cal is not None  # the manifest validator demands it for int8
    paths = calibration_inputs(target, calib_paths, key)
    preprocess = {"height": input.height, "width": input.width, "color": input.color,
                  "interpolation": input.interpolation, "layout": "NCHW float32 0..255"}
    params: dict[str, Any] = {"mode": "int8", "recipe": int8.RECIPE, "method": cal.method,
                              "batches": cal.batches, "batch_size": target.batch_size,
                              "max_images": cal.batches * target.batch_size, "preprocess": preprocess,
                              "op_types": list(int8.QUANT_OPS)}
    if cal.method == "percentile":
        params["percentile"] = cal.percentile
    if cpu:  # only here: the TensorRT-facing stage keeps its fingerprint
        params["graph"] = "cpu: uint8 activations with zero points, int32 biases"

    def run_int8(ctx: StageContext) -> StageResult:
        images = LazyImages(paths, input)
        ctx.log(f"calibrating on {len(images)} image(s), method {cal.method}")
        src = ctx.artifact(source.file).read_bytes()
        data, record = int8.quantize_int8(src, images, method=cal.method,
                                          percentile=cal.percentile, workdir=ctx.tempdir() / kind,
                                          log=ctx.log, adapt=adapt, cpu=cpu,
                                          progress=lambda d, t: ctx.progress("calibration images", d, t))
        record["check"] = smoke_test(ctx, data, src, input, out, probe_paths, adapt)
        return StageResult({out: data}, record)

    graph = "uint8/int32 Q/DQ for onnxruntime's CPU kernels" if cpu else "Q/DQ"
    stage = Stage(f"precision.{kind}", run_int8, params=params,
                  inputs={f"calib[{i:03d}]": p for i, p in enumerate(paths)},
                  deps=(source.stage,), outputs=(out,), tools=TOOLS,
                  description=f"quantise the ONNX to int8 {graph} ({cal.method} calibration, {len(paths)} images)")
    return stage
