"""Precision stages: the fp16 or int8 ONNX a TensorRT engine is built from (fp32 needs none).

``precision.fp16`` converts the final ONNX with onnxconverter-common; ``precision.int8`` calibrates on the
manifest's calibration images (at most ``batches`` x ``batch_size``, preprocessed exactly like parity) and
writes Q/DQ with onnxruntime. The calibration images are the stage's inputs, so changing, adding or
removing one re-runs the calibration; the record keeps the method, the images' digest and the scales' digest.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # numpy is imported where it is used: planning (a no-op apply) never needs it
    import numpy as np

from ..errors import ImageError, StageFailed
from ..manifest import Input, TensorRTTarget
from ..pipeline import Stage, StageContext, StageResult
from . import ArtifactRef

TOOLS = ("onnx", "onnxruntime", "onnxconverter-common")


def _smoke_test(data: bytes, inp: Input, what: str, adapt: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> None:
    """The artifact loads in onnxruntime and gives finite features on two pseudo-random images."""
    import numpy as np
    import onnxruntime as ort

    from ..backends.onnxruntime import adapt_input, session_options

    x = np.random.default_rng(0).uniform(0, 255, (2, 3, inp.height, inp.width)).astype(np.float32)
    try:
        sess = ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
        i = sess.get_inputs()[0]
        shape = list(i.shape)
        feed = x if not isinstance(shape[0], int) or shape[0] == 2 else x[: shape[0]]
        out = sess.run(None, {i.name: adapt(feed) if adapt else adapt_input(feed, i.type, shape)})[0]
    except Exception as exc:
        raise StageFailed(f"{what}: onnxruntime cannot run the model: {str(exc).splitlines()[0]}") from None
    if not np.all(np.isfinite(np.asarray(out, dtype=np.float64))):
        raise StageFailed(f"{what}: onnxruntime gives non-finite outputs")


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


def calibration_inputs(target: TensorRTTarget, calib_paths: list[Path]) -> list[Path]:
    """The images calibration uses: the glob's sorted matches, at most ``batches`` x ``batch_size``."""
    cal = target.calibration
    if cal is None:
        raise ImageError("targets.tensorrt.calibration is required for mode int8")
    limit = cal.batches * target.batch_size
    paths = list(calib_paths)[:limit]
    if not paths:
        raise ImageError(f"targets.tensorrt.calibration.images: glob {cal.images!r} matches no file")
    return paths


def precision_stage(target: TensorRTTarget, source: ArtifactRef, name: str, calib_paths: list[Path],
                    input: Input,  # noqa: A002 (manifest's name)
                    adapt: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Optional[tuple[Stage, ArtifactRef]]:
    """The stage that writes ``<name>.fp16.onnx`` / ``<name>.int8.onnx`` from ``source``; None for fp32."""
    mode = target.mode
    if mode == "fp32":
        return None
    out = f"{name}.{mode}.onnx"
    if mode == "fp16":
        from ..precision import fp16

        def run_fp16(ctx: StageContext) -> StageResult:
            data, record = fp16.convert_fp16(ctx.artifact(source.file).read_bytes())
            _smoke_test(data, input, out, adapt)
            return StageResult({out: data}, record)

        stage = Stage(f"precision.{mode}", run_fp16,
                      params={"mode": mode, "recipe": fp16.RECIPE, "keep_fp32_ops": list(fp16.KEEP_FP32_OPS)},
                      deps=(source.stage,), outputs=(out,), tools=TOOLS,
                      description="convert the ONNX to fp16 (float32 I/O, sensitive ops kept in fp32)")
        return stage, ArtifactRef(stage.name, out)

    from ..precision import int8

    cal = target.calibration
    assert cal is not None  # the manifest validator demands it for int8
    paths = calibration_inputs(target, calib_paths)
    preprocess = {"height": input.height, "width": input.width, "color": input.color,
                  "interpolation": input.interpolation, "layout": "NCHW float32 0..255"}
    params: dict[str, Any] = {"mode": mode, "recipe": int8.RECIPE, "method": cal.method,
                              "batches": cal.batches, "batch_size": target.batch_size,
                              "max_images": cal.batches * target.batch_size, "preprocess": preprocess,
                              "op_types": list(int8.QUANT_OPS)}
    if cal.method == "percentile":
        params["percentile"] = cal.percentile

    def run_int8(ctx: StageContext) -> StageResult:
        images = LazyImages(paths, input)
        ctx.log(f"calibrating on {len(images)} image(s), method {cal.method}")
        data, record = int8.quantize_int8(ctx.artifact(source.file).read_bytes(), images, method=cal.method,
                                          percentile=cal.percentile, workdir=ctx.tempdir() / "int8",
                                          log=ctx.log, adapt=adapt,
                                          progress=lambda d, t: ctx.progress("calibration images", d, t))
        _smoke_test(data, input, out, adapt)
        return StageResult({out: data}, record)

    stage = Stage(f"precision.{mode}", run_int8, params=params,
                  inputs={f"calib[{i:03d}]": p for i, p in enumerate(paths)},
                  deps=(source.stage,), outputs=(out,), tools=TOOLS,
                  description=f"quantise the ONNX to int8 Q/DQ ({cal.method} calibration, {len(paths)} images)")
    return stage, ArtifactRef(stage.name, out)
