"""ONNX stages: export the PyTorch model (TorchScript exporter, reproducible bytes) and simplify it."""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # numpy is imported where it is used: planning (a no-op apply) never needs it
    import numpy as np

    from ..probe import Probe

from ..errors import StageFailed
from ..manifest import LoadedManifest
from ..pipeline import Stage, StageContext, StageResult
from ..sources import ModelSource
from ..targets.onnx import onnx_target
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
            torch.onnx.export(model.eval(), (torch.zeros(1, 3, height, width),), buf,  # type: ignore[arg-type]
                              dynamo=False, opset_version=opset, input_names=["input"], output_names=["output"],
                              dynamic_axes=dynamic, do_constant_folding=True)
        except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
            raise StageFailed(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    data = buf.getvalue()
    buf.close()  # one copy of the model's bytes, not two
    return data


def check_model(data: bytes, probe: Probe, what: str) -> np.ndarray:
    """onnx checker + one onnxruntime run on the self-check images (``reidbuild.selfcheck``); returns the
    features.

    The checker gets the bytes themselves: given a parsed model it would serialise it again (about 0.1 s and
    one more copy for an R50).
    """
    import onnx

    from .. import selfcheck

    try:
        onnx.checker.check_model(data, full_check=True)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"{what}: the ONNX checker rejects the model: {str(exc).splitlines()[0]}") from None
    return selfcheck.features(data, probe.images, what)


def _checked_key(name: str) -> str:
    """Per-run memo key for an ONNX artifact's check features: the simplify stage reuses the export check."""
    return f"onnx_check_features:{name}"


def graph_summary(model: Any) -> dict[str, Any]:
    """Op-type counts and node/initializer totals of an ONNX model: what ``graph_changes`` compares, small
    enough to keep after the model itself is dropped."""
    from collections import Counter

    return {"ops": Counter(n.op_type for n in model.graph.node), "nodes": len(model.graph.node),
            "initializers": len(model.graph.initializer)}


def graph_changes(before: Any, after: Any) -> dict[str, Any]:
    """What onnx-simplifier did, as counts: nodes per op type that changed, initializers, and totals.

    ``before``/``after`` are ONNX models or their ``graph_summary``."""
    b = before if isinstance(before, dict) else graph_summary(before)
    a = after if isinstance(after, dict) else graph_summary(after)
    ops_b, ops_a = b["ops"], a["ops"]
    changed = {op: ops_a[op] - ops_b[op] for op in sorted(set(ops_b) | set(ops_a)) if ops_a[op] != ops_b[op]}
    return {"nodes_before": b["nodes"], "nodes_after": a["nodes"], "op_count_changes": changed,
            "initializers_before": b["initializers"], "initializers_after": a["initializers"]}


def simplify_file(src: Path, folder: Path, what: str) -> tuple[bytes, dict[str, Any]]:
    """(bytes, ``graph_summary``) of onnx-simplifier's result for the ONNX file ``src``, run file to file.

    onnx-simplifier's C++ core reads ``src`` and writes its result into ``folder`` itself, so Python never
    holds the parsed input, nor the result next to a serialised copy (an R50: ~200 MB less at this stage's
    peak). ONNX messages have no map fields, so the C++ bytes are those of a deterministic serialisation.
    """
    import onnxsim

    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / "simplified.onnx"
    try:
        # no external data below 2 GB: the artifact is one self-contained file, as before
        simplified, ok = onnxsim.simplify(str(src), output_path=str(dst), external_data_threshold="2GB")
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"onnx-simplifier failed on {what}: {str(exc).splitlines()[0]}") from None
    if not ok:
        raise StageFailed(f"onnx-simplifier could not validate its result for {what}")
    summary = graph_summary(simplified)
    del simplified
    if sorted(p.name for p in folder.iterdir()) != [dst.name]:
        raise StageFailed(f"onnx-simplifier wrote {what} with external data (over 2 GB): not supported")
    try:
        return dst.read_bytes(), summary
    finally:
        dst.unlink()


def _check_record(probe: Probe, notes: list[str]) -> dict[str, Any]:
    """What the lock keeps about a self-check: its images and what the model itself did on them."""
    rec: dict[str, Any] = probe.describe()
    if notes:
        rec["model_nonfinite"] = notes
    return rec


def export_stage(lm: LoadedManifest, source: ModelSource, load: ArtifactRef, out_file: str,
                 probe_paths: Optional[Sequence[Path]] = None) -> Stage:
    """``onnx.export`` (output: ``out_file``); its self-check runs the export on ``probe_paths`` (the first parity images, or
    person-like images) and blames the exporter only for non-finite outputs PyTorch does not give too."""
    t = onnx_target(lm.model)
    h, w = lm.model.input.height, lm.model.input.width

    def run(ctx: StageContext) -> StageResult:
        import torch

        from .. import selfcheck
        from ..backends.torch import TorchRunner

        ctx.progress("export steps (trace, check)", 0, 2)
        model = model_from(ctx, source)
        data = export_onnx(model, h, w, t.opset, t.dynamic_batch)
        ctx.progress("export steps (trace, check)", 1, 2)
        probe = probe_for(ctx, lm.model.input, probe_paths)
        out = check_model(data, probe, out_file)
        notes = selfcheck.judge_finite(out, probe, out_file, lambda: TorchRunner(model).infer(probe.images), "PyTorch")
        for note in notes:
            ctx.log(note)
        ctx.cache[_checked_key(out_file)] = out
        ctx.progress("export steps (trace, check)", 2, 2)
        return StageResult({out_file: data}, {"exporter": EXPORTER, "torch": torch.__version__, "opset": t.opset,
                                              "check": _check_record(probe, notes)})

    stage = Stage("onnx.export", run, params={"opset": t.opset, "dynamic_batch": t.dynamic_batch, "input": [h, w],
                                                "exporter": "torchscript"},
                  deps=(load.stage,), outputs=(out_file,), tools=("torch", "onnx"),
                  description="export the PyTorch model to ONNX")
    return stage


def simplify_stage(lm: LoadedManifest, source: ArtifactRef, out_file: str,
                   probe_paths: Optional[Sequence[Path]] = None) -> Stage:
    """``onnx.simplify`` (output: ``out_file``); the result must compute the exported graph's outputs on the self-check images to
    within ``selfcheck.SCALE_BOUND`` of their scale."""
    h, w = lm.model.input.height, lm.model.input.width

    def run(ctx: StageContext) -> StageResult:
        import numpy as np
        import onnx

        from .. import selfcheck

        src = ctx.artifact(source.file)
        raw = src.read_bytes()
        probe = probe_for(ctx, lm.model.input, probe_paths)
        # the export stage checked these very bytes on the same images earlier in this run: reuse its features
        before = ctx.cache.pop(_checked_key(source.file), None)
        if before is None:
            before = check_model(raw, probe, source.file)
        shape_before = graph_summary(onnx.load_from_string(raw))
        raw_size = len(raw)
        del raw  # onnx-simplifier reads the file itself
        data, shape_after = simplify_file(src, ctx.tempdir() / "onnx.simplify", source.file)
        changes = graph_changes(shape_before, shape_after)
        notes = selfcheck.judge_finite(before, probe, source.file, lambda: before, "the exported graph")
        check = _check_record(probe, notes)
        if len(data) == raw_size and data == src.read_bytes():  # nothing simplified: the checked export's bytes
            changes["unchanged"] = True
            return StageResult({out_file: data}, {**changes, "check_max_abs_diff": 0.0, "check_scaled_diff": 0.0,
                                                  "check": check, "onnx": onnx.__version__})
        after = check_model(data, probe, out_file)
        rel = selfcheck.check_same(after, before, probe, f"{out_file}: onnx-simplifier")
        finite = np.isfinite(before).all(axis=1) & np.isfinite(after).all(axis=1)
        err = float(np.max(np.abs(after[finite] - before[finite]), initial=0.0))
        return StageResult({out_file: data}, {**changes, "check_max_abs_diff": float(f"{err:.3g}"),
                                              "check_scaled_diff": float(f"{rel:.3g}"), "check": check,
                                              "onnx": onnx.__version__})

    stage = Stage("onnx.simplify", run, params={"input": [h, w]}, deps=(source.stage,), outputs=(out_file,),
                  tools=("onnx", "onnxsim", "onnxruntime"), description="simplify the ONNX graph (onnx-simplifier)")
    return stage


