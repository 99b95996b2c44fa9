"""ONNX stages: export the PyTorch model (TorchScript exporter, reproducible bytes) and simplify it."""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from ..errors import StageFailed
from ..manifest import LoadedManifest
from ..pipeline import Stage, StageContext, StageResult
from . import ArtifactRef
from .load import model_from

EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"


def export_onnx(model: Any, height: int, width: int, opset: int, dynamic_batch: bool) -> bytes:
    """Export to ONNX bytes with input ``input`` [N,3,H,W] and output ``output`` [N,D].

    The TorchScript exporter is used on purpose: the dynamo exporter embeds absolute source paths and cannot
    write opset 17, so its bytes change with the checkout folder.
    """
    import torch

    buf = io.BytesIO()
    dynamic = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model.eval(), (torch.zeros(1, 3, height, width),), buf, dynamo=False,
                              opset_version=opset, input_names=["input"], output_names=["output"],
                              dynamic_axes=dynamic, do_constant_folding=True)
        except Exception as exc:
            raise StageFailed(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    return buf.getvalue()


def check_model(data: bytes, height: int, width: int, what: str) -> tuple[Any, np.ndarray]:
    """onnx checker + one onnxruntime run on a fixed pseudo-random image; returns (model, features)."""
    import onnx
    import onnxruntime as ort

    from ..backends.onnxruntime import session_options

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise StageFailed(f"{what}: the ONNX checker rejects the model: {str(exc).splitlines()[0]}") from None
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, height, width)).astype(np.float32)
    try:
        sess = ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        shape = sess.get_inputs()[0].shape
        feed = x if not isinstance(shape[0], int) or shape[0] == 2 else x[: shape[0]]
        out = sess.run(None, {name: feed})[0]
    except Exception as exc:
        raise StageFailed(f"{what}: onnxruntime cannot run the model: {str(exc).splitlines()[0]}") from None
    if not np.all(np.isfinite(out)):
        raise StageFailed(f"{what}: onnxruntime gives non-finite outputs")
    return model, out


def export_stage(lm: LoadedManifest, cfg: dict[str, Any], load: ArtifactRef, out_file: str) -> tuple[Stage, ArtifactRef]:
    t = lm.model.targets.onnx
    h, w = lm.model.input.height, lm.model.input.width

    def run(ctx: StageContext) -> StageResult:
        ctx.progress("export steps (trace, check)", 0, 2)
        data = export_onnx(model_from(ctx, lm, cfg), h, w, t.opset, t.dynamic_batch)
        ctx.progress("export steps (trace, check)", 1, 2)
        check_model(data, h, w, out_file)
        ctx.progress("export steps (trace, check)", 2, 2)
        import torch

        return StageResult({out_file: data}, {"exporter": EXPORTER, "torch": torch.__version__, "opset": t.opset})

    stage = Stage("onnx.export", run, params={"opset": t.opset, "dynamic_batch": t.dynamic_batch, "input": [h, w],
                                                "exporter": "torchscript"},
                  deps=(load.stage,), outputs=(out_file,), tools=("torch", "onnx"),
                  description="export the PyTorch model to ONNX")
    return stage, ArtifactRef(stage.name, out_file)


def simplify_stage(lm: LoadedManifest, source: ArtifactRef, out_file: str) -> tuple[Stage, ArtifactRef]:
    h, w = lm.model.input.height, lm.model.input.width

    def run(ctx: StageContext) -> StageResult:
        import onnx
        import onnxsim

        raw = ctx.artifact(source.file).read_bytes()
        model, before = check_model(raw, h, w, source.file)
        try:
            simplified, ok = onnxsim.simplify(model)
        except Exception as exc:
            raise StageFailed(f"onnx-simplifier failed on {source.file}: {str(exc).splitlines()[0]}") from None
        if not ok:
            raise StageFailed(f"onnx-simplifier could not validate its result for {source.file}")
        data = simplified.SerializeToString(deterministic=True)
        _, after = check_model(data, h, w, out_file)
        err = float(np.max(np.abs(after - before)))
        if not np.allclose(after, before, rtol=1e-4, atol=1e-5):
            raise StageFailed(f"simplified model differs from the exported one (max abs diff {err:.3g})")
        return StageResult({out_file: data}, {"nodes_before": len(model.graph.node),
                                              "nodes_after": len(simplified.graph.node),
                                              "check_max_abs_diff": float(f"{err:.3g}"),
                                              "onnx": onnx.__version__})

    stage = Stage("onnx.simplify", run, params={"input": [h, w]}, deps=(source.stage,), outputs=(out_file,),
                  tools=("onnx", "onnxsim", "onnxruntime"), description="simplify the ONNX graph (onnx-simplifier)")
    return stage, ArtifactRef(stage.name, out_file)


