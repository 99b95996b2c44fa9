"""Patch stages: apply the manifest's graph patches to the ONNX model (``onnx.patch``) or Caffe net
(``caffe.patch``), checking the graph after every patch.

Patch files are validated when the stage is built (plan time), so a typo fails before anything runs; they
are read again when the stage runs, and their hashes are the stage's inputs: editing a patch re-runs this
stage and what follows it, never what comes before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from ..errors import PatchError
from ..manifest import Input
from ..pipeline import Stage, StageContext, StageResult
from . import ArtifactRef, probe_for

ENGINE_VERSION = 1  # bump when an op's meaning changes, so locked builds re-run their patch stages


def patch_stage(fmt: Literal["onnx", "caffe"], patch_paths: list[Path], source: list[ArtifactRef],
                out_files: list[str], name: str, *, dialect: Optional[str],
                check_input_shape: tuple[int, int, int, int], probe_input: Optional[Input] = None,
                probe_paths: Optional[Sequence[Path]] = None) -> Stage:
    """The ``onnx.patch`` / ``caffe.patch`` stage.

    ``source``: the ONNX artifact, or the prototxt and caffemodel artifacts (in that order, as
    ``caffe.convert`` declares its outputs); ``out_files``: the same kinds of files to write, in the same order
    (the stage's outputs). ``name`` is the model's name (for messages). ``check_input_shape`` (N, C, H, W) fills
    symbolic dims for the onnxruntime check run, and is the Caffe input shape when the prototxt lacks one.
    ``probe_input``/``probe_paths``: how to load the ONNX check's images (the first parity images,
    preprocessed like parity; person-like images of the check shape when absent).
    """
    from ..patches import spec

    if fmt not in ("onnx", "caffe"):
        raise ValueError(f"unknown patch format {fmt!r}")
    if fmt == "caffe" and dialect is None:
        raise ValueError("a caffe patch stage needs the dialect")
    paths = [Path(p) for p in patch_paths]
    loaded = spec.load_patches(paths, fmt)  # plan time: validation errors surface before anything runs
    shape = tuple(int(x) for x in check_input_shape)
    if len(shape) != 4:
        raise ValueError(f"check_input_shape must be (N, C, H, W), got {check_input_shape}")
    src_files = [a.file for a in source]
    if fmt == "onnx":
        if len(source) != 1 or len(out_files) != 1:
            raise ValueError("an onnx patch stage reads one .onnx and writes one .onnx")
    elif len(source) != 2 or len(out_files) != 2:
        raise ValueError("a caffe patch stage reads a prototxt and a caffemodel and writes the same two, in that order")
    else:
        src_proto, src_model = src_files
        out_proto, out_model = out_files

    def run(ctx: StageContext) -> StageResult:
        from ..patches import apply as papply

        patches = spec.load_patches(paths, fmt)  # as hashed for this run (the file may have been edited)
        if fmt == "onnx":
            src = source[0].file
            data = ctx.artifact(src).read_bytes()
            images = probe_for(ctx, probe_input, probe_paths).images if probe_input is not None else None
            out, records = papply.apply_onnx(data, patches, input_shape=shape, what=f"{name}: {src}", images=images)
            ctx.log(_summary(records))
            return StageResult({out_files[0]: out}, _record(records, patches))
        text = ctx.artifact(src_proto).read_text(encoding="utf-8")
        weights = ctx.artifact(src_model).read_bytes()
        assert dialect is not None
        new_text, new_weights, records = papply.apply_caffe(text, weights, patches, dialect=dialect,
                                                           input_shape=shape, what=f"{name}: {src_proto}")
        assert new_weights is not None
        ctx.log(_summary(records))
        return StageResult({out_proto: new_text.encode("utf-8"), out_model: new_weights},
                           _record(records, patches, dialect))

    tools = ("onnx", "onnxruntime", "protobuf") if fmt == "onnx" else ("protobuf",)
    params: dict[str, Any] = {"format": fmt, "dialect": dialect, "check_input_shape": list(shape),
                              "engine": ENGINE_VERSION, "patches": len(paths)}
    if fmt == "onnx":
        from ..patches import input_layout, output_transforms

        params["output_transforms"] = output_transforms(loaded)
        params["input_layout"] = input_layout(loaded)
    elif any(lp.model.changes_input for lp in loaded):  # the loader refuses this; kept as a guard
        raise PatchError("Caffe patches cannot change the input layout")
    def diff(output_dir: Path) -> list[tuple[Path, str]]:
        from ..patches import diff_patches

        return diff_patches(fmt, paths, [output_dir / f for f in src_files], dialect=dialect,
                            check_input_shape=shape)

    return Stage(f"{fmt}.patch", run, params=params, diff=diff,
                 inputs={f"patch[{i}]": p for i, p in enumerate(paths)},
                 deps=tuple(dict.fromkeys(a.stage for a in source)), outputs=tuple(out_files), tools=tools,
                 description=f"apply {len(paths)} graph patch{'es' if len(paths) != 1 else ''} to the "
                             f"{'ONNX model' if fmt == 'onnx' else 'Caffe net'}")


def _summary(records: list[dict[str, Any]]) -> str:
    parts = []
    for r in records:
        ops = ", ".join(f"{o['op']}x{o['matched']}" for o in r["ops"])
        parts.append(f"{r['file']}: {ops}")
    return "; ".join(parts) or "no patches"


def _record(records: list[dict[str, Any]], patches: list[Any], dialect: Optional[str] = None) -> dict[str, Any]:
    from ..patches import input_layout, output_transforms

    rec: dict[str, Any] = {"patches": records, "output_transforms": output_transforms(patches)}
    if dialect is None:
        rec["input_layout"] = input_layout(patches)
    else:
        rec["dialect"] = dialect
    return rec
