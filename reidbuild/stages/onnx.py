"""ONNX stages: export the PyTorch model (TorchScript exporter, reproducible bytes) and simplify it."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

if TYPE_CHECKING:  # numpy is imported where it is used: planning (a no-op apply) never needs it
    import numpy as np

    from ..probe import Probe

from ..errors import StageFailed
from ..manifest import LoadedManifest
from ..pipeline import Stage, StageContext, StageResult
from ..sources import ModelSource
from ..targets.onnx import onnx_target
from . import ArtifactRef, probe_for
from .load import model_from, park_model
from .spill import Spill, weights_spilled

EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"


def export_spilled(model: Any, height: int, width: int, opset: int, dynamic_batch: bool,
                   spill_to: Optional[Path]) -> tuple[bytes, Optional[Spill]]:
    """ONNX bytes with input ``input`` [N,3,H,W] and output ``output`` [N,D]. With ``spill_to`` (a scratch
    folder), the model's weights are parked there while the exporter serialises (``reidbuild.stages.spill``:
    the same bytes, one model's size less at the build's peak) and stay there: the returned ``Spill`` must be
    restored before the model is used again.

    The TorchScript exporter is used on purpose: the dynamo exporter embeds absolute source paths and cannot
    write opset 17, so its bytes change with the checkout folder. It writes to a stream, not a file: the
    stream's copy comes after the exporter's own peak, and a file costs a page-cache write and a read back
    (~0.15 s of CPU for an R50).
    """
    import torch

    buf = io.BytesIO()
    dynamic = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    spilled = weights_spilled(model, spill_to) if spill_to is not None else contextlib.nullcontext(None)
    with warnings.catch_warnings(), spilled as spill:
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model.eval(), (torch.zeros(1, 3, height, width),), buf,  # type: ignore[arg-type]
                              dynamo=False, opset_version=opset, input_names=["input"], output_names=["output"],
                              dynamic_axes=dynamic, do_constant_folding=True)
        except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
            raise StageFailed(f"ONNX export failed: {str(exc).splitlines()[0]}") from None
    data = buf.getvalue()
    buf.close()  # one copy of the model's bytes, not two
    return data, spill


def export_onnx(model: Any, height: int, width: int, opset: int, dynamic_batch: bool) -> bytes:
    """``export_spilled`` without a spill, for callers that keep using the model (tests, benchmarks)."""
    return export_spilled(model, height, width, opset, dynamic_batch, None)[0]


def check_model(model: Union[bytes, Path], probe: Probe, what: str) -> np.ndarray:
    """onnx checker + one onnxruntime run on the self-check images (``reidbuild.selfcheck``); returns the
    features.

    The checker gets the bytes or the file themselves: given a parsed model it would serialise it again (about
    0.1 s and one more copy for an R50). Given a file, neither the checker nor onnxruntime needs the model's
    bytes in Python: a stage that checks a file before reading it holds one copy fewer while onnxruntime
    builds its session (which transiently needs about 2.5 times the weights: 430 MB for an R101).
    """
    import onnx

    from .. import selfcheck

    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"{what}: the ONNX checker rejects the model: {str(exc).splitlines()[0]}") from None
    return selfcheck.features(model, probe.images, what)


def _checked_key(name: str) -> str:
    """Per-run memo key for an ONNX artifact's check features: the simplify stage reuses the export check."""
    return f"onnx_check_features:{name}"


def graph_summary(model: Any) -> dict[str, Any]:
    """Op-type counts and node/initializer totals of an ONNX model: what ``graph_changes`` compares, small
    enough to keep after the model itself is dropped."""
    from collections import Counter

    return {"ops": Counter(n.op_type for n in model.graph.node), "nodes": len(model.graph.node),
            "initializers": len(model.graph.initializer)}


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    """A protobuf varint at ``pos``: (value, next position)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of the length-delimited fields of the message in ``buf[start:end]``; other
    wire types are skipped (groups, never written by ONNX, raise ValueError)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            yield key >> 3, pos, pos + size
            pos += size
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")


def file_summary(path: Path) -> dict[str, Any]:
    """``graph_summary`` of the ONNX file ``path``, read from its protobuf encoding without parsing the
    weights (ModelProto.graph = 7; GraphProto.node = 1, .initializer = 5; NodeProto.op_type = 4): parsing an
    R50 only to count its nodes cost ~0.1 s of CPU and a second copy of its weights."""
    import mmap
    from collections import Counter

    ops: Counter[str] = Counter()
    nodes = initializers = 0
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for field, start, end in _fields(buf, 0, len(buf)):
                if field != 7:
                    continue
                for gfield, gstart, gend in _fields(buf, start, end):
                    if gfield == 1:
                        op = ""
                        for nfield, nstart, nend in _fields(buf, gstart, gend):
                            if nfield == 4:
                                op = bytes(buf[nstart:nend]).decode("utf-8")
                        ops[op] += 1
                        nodes += 1
                    elif gfield == 5:
                        initializers += 1
    except (ValueError, IndexError, UnicodeDecodeError) as exc:  # empty, truncated or not protobuf
        raise StageFailed(f"{path.name}: not a readable ONNX model ({exc})") from None
    return {"ops": ops, "nodes": nodes, "initializers": initializers}


def graph_changes(before: Any, after: Any) -> dict[str, Any]:
    """What onnx-simplifier did, as counts: nodes per op type that changed, initializers, and totals.

    ``before``/``after`` are ONNX models or their ``graph_summary``."""
    b = before if isinstance(before, dict) else graph_summary(before)
    a = after if isinstance(after, dict) else graph_summary(after)
    ops_b, ops_a = b["ops"], a["ops"]
    changed = {op: ops_a[op] - ops_b[op] for op in sorted(set(ops_b) | set(ops_a)) if ops_a[op] != ops_b[op]}
    return {"nodes_before": b["nodes"], "nodes_after": a["nodes"], "op_count_changes": changed,
            "initializers_before": b["initializers"], "initializers_after": a["initializers"]}


def simplify_file(src: Path, folder: Path, what: str) -> tuple[Path, dict[str, Any]]:
    """(file, ``graph_summary``) of onnx-simplifier's result for the ONNX file ``src``, run file to file; the
    file is ``folder/simplified.onnx``, the caller's to read and remove.

    onnx-simplifier's C++ core reads ``src`` and writes its result into ``folder`` itself, so Python never
    holds the parsed input, nor the result next to a serialised copy (an R50: ~200 MB less at this stage's
    peak); the caller can self-check the file before it reads the bytes. ONNX messages have no map fields, so
    the C++ bytes are those of a deterministic serialisation.
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
    return dst, summary


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (sizes first: most differ there)."""
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


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
        data, spill = export_spilled(model, h, w, t.opset, t.dynamic_batch, ctx.tempdir())
        del model  # its weights are parked until the next model_from (this check's fallback, or parity)
        if spill is not None:
            park_model(ctx, spill)
        ctx.progress("export steps (trace, check)", 1, 2)
        probe = probe_for(ctx, lm.model.input, probe_paths)
        out = check_model(data, probe, out_file)
        notes = selfcheck.judge_finite(out, probe, out_file,
                                       lambda: TorchRunner(model_from(ctx, source)).infer(probe.images), "PyTorch")
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
        probe = probe_for(ctx, lm.model.input, probe_paths)
        # the export stage checked these very bytes on the same images earlier in this run: reuse its features
        before = ctx.cache.pop(_checked_key(source.file), None)
        if before is None:
            before = check_model(src, probe, source.file)
        shape_before = file_summary(src)
        dst, shape_after = simplify_file(src, ctx.tempdir() / "onnx.simplify", source.file)
        changes = graph_changes(shape_before, shape_after)
        notes = selfcheck.judge_finite(before, probe, source.file, lambda: before, "the exported graph")
        check = _check_record(probe, notes)
        if same_bytes(dst, src):  # nothing simplified: the checked export's bytes
            changes["unchanged"] = True
            record = {"check_max_abs_diff": 0.0, "check_scaled_diff": 0.0}
        else:  # checked from the file: onnxruntime builds its session with no bytes of the model in Python
            after = check_model(dst, probe, out_file)
            rel = selfcheck.check_same(after, before, probe, f"{out_file}: onnx-simplifier")
            finite = np.isfinite(before).all(axis=1) & np.isfinite(after).all(axis=1)
            err = float(np.max(np.abs(after[finite] - before[finite]), initial=0.0))
            record = {"check_max_abs_diff": float(f"{err:.3g}"), "check_scaled_diff": float(f"{rel:.3g}")}
        data = dst.read_bytes()
        dst.unlink()
        return StageResult({out_file: data}, {**changes, **record, "check": check, "onnx": onnx.__version__})

    stage = Stage("onnx.simplify", run, params={"input": [h, w]}, deps=(source.stage,), outputs=(out_file,),
                  tools=("onnx", "onnxsim", "onnxruntime"), description="simplify the ONNX graph (onnx-simplifier)")
    return stage


