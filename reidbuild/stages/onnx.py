"""ONNX stages: export the PyTorch model (TorchScript exporter, reproducible bytes) and simplify it."""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .. import selfcheck
from ..errors import StageFailed
from ..manifest import LoadedManifest
from ..pipeline import Stage, StageContext, StageResult
from ..probe import Probe
from . import ArtifactRef, probe_for
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


def check_model(data: bytes, probe: Probe, what: str) -> tuple[Any, np.ndarray]:
    """onnx checker + one onnxruntime run on the self-check images; returns (model, features)."""
    import onnx

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise StageFailed(f"{what}: the ONNX checker rejects the model: {str(exc).splitlines()[0]}") from None
    return model, selfcheck.features(data, probe.images, what)


def _check_record(probe: Probe, notes: list[str]) -> dict[str, Any]:
    """What the lock keeps about a self-check: its images and what the model itself did on them."""
    rec: dict[str, Any] = probe.describe()
    if notes:
        rec["model_nonfinite"] = notes
    return rec


def export_stage(lm: LoadedManifest, cfg: dict[str, Any], load: ArtifactRef, out_file: str,
                 probe_paths: Optional[Sequence[Path]] = None) -> tuple[Stage, ArtifactRef]:
    """``onnx.export``; its self-check runs the export on ``probe_paths`` (the first parity images, or
    person-like images) and blames the exporter only for non-finite outputs PyTorch does not give too."""
    t = lm.model.targets.onnx
    h, w = lm.model.input.height, lm.model.input.width

    def run(ctx: StageContext) -> StageResult:
        import torch

        from ..backends.torch import TorchRunner

        model = model_from(ctx, lm, cfg)
        data = export_onnx(model, h, w, t.opset, t.dynamic_batch)
        probe = probe_for(ctx, lm.model.input, probe_paths)
        _, out = check_model(data, probe, out_file)
        notes = selfcheck.judge_finite(out, probe, out_file, lambda: TorchRunner(model).infer(probe.images), "PyTorch")
        for note in notes:
            ctx.log(note)
        return StageResult({out_file: data}, {"exporter": EXPORTER, "torch": torch.__version__, "opset": t.opset,
                                              "check": _check_record(probe, notes)})

    stage = Stage("onnx.export", run, params={"opset": t.opset, "dynamic_batch": t.dynamic_batch, "input": [h, w],
                                                "exporter": "torchscript"},
                  deps=(load.stage,), outputs=(out_file,), tools=("torch", "onnx"),
                  description="export the PyTorch model to ONNX")
    return stage, ArtifactRef(stage.name, out_file)


def simplify_stage(lm: LoadedManifest, source: ArtifactRef, out_file: str,
                   probe_paths: Optional[Sequence[Path]] = None) -> tuple[Stage, ArtifactRef]:
    """``onnx.simplify``; the result must compute the exported graph's outputs on the self-check images to
    within ``selfcheck.SCALE_BOUND`` of their scale."""
    h, w = lm.model.input.height, lm.model.input.width

    def run(ctx: StageContext) -> StageResult:
        import onnx
        import onnxsim

        raw = ctx.artifact(source.file).read_bytes()
        probe = probe_for(ctx, lm.model.input, probe_paths)
        model, before = check_model(raw, probe, source.file)
        try:
            simplified, ok = onnxsim.simplify(model)
        except Exception as exc:
            raise StageFailed(f"onnx-simplifier failed on {source.file}: {str(exc).splitlines()[0]}") from None
        if not ok:
            raise StageFailed(f"onnx-simplifier could not validate its result for {source.file}")
        data = simplified.SerializeToString(deterministic=True)
        _, after = check_model(data, probe, out_file)
        rel = selfcheck.check_same(after, before, probe, f"{out_file}: onnx-simplifier")
        finite = np.isfinite(before).all(axis=1) & np.isfinite(after).all(axis=1)
        err = float(np.max(np.abs(after[finite] - before[finite]), initial=0.0))
        notes = selfcheck.judge_finite(before, probe, source.file, lambda: before, "the exported graph")
        return StageResult({out_file: data}, {"nodes_before": len(model.graph.node),
                                              "nodes_after": len(simplified.graph.node),
                                              "check_max_abs_diff": float(f"{err:.3g}"),
                                              "check_scaled_diff": float(f"{rel:.3g}"),
                                              "check": _check_record(probe, notes), "onnx": onnx.__version__})

    stage = Stage("onnx.simplify", run, params={"input": [h, w]}, deps=(source.stage,), outputs=(out_file,),
                  tools=("onnx", "onnxsim", "onnxruntime"), description="simplify the ONNX graph (onnx-simplifier)")
    return stage, ArtifactRef(stage.name, out_file)


