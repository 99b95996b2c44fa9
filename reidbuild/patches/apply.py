"""Apply a list of patches to an ONNX model or a Caffe net, checking the graph after each one.

The stage (``reidbuild/stages/patch.py``) and ``reidbuild plan --diff`` share these functions: the stage
keeps the final bytes, the diff keeps a text snapshot before and after every patch.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..errors import InputError, PatchError, StageFailed
from . import spec

Snapshot = Callable[[spec.LoadedPatch, str, str], None]  # (patch, text before, text after)


def patch_record(index: int, lp: spec.LoadedPatch, ops: list[dict[str, Any]]) -> dict[str, Any]:
    """What the lock records about one applied patch."""
    rec: dict[str, Any] = {"role": f"patch[{index}]", "file": lp.path.name, "sha256": lp.sha256,
                           "format": lp.format, "ops": ops}
    if lp.model.description:
        rec["description"] = lp.model.description
    if lp.model.changes_output:
        rec["changes_output"] = lp.model.changes_output
    if lp.model.changes_input:
        rec["changes_input"] = lp.model.changes_input
    return rec


# ---------------------------------------------------------------------------------------------- ONNX


def load_onnx(data: bytes, what: str) -> Any:
    import onnx

    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"{what}: not a readable ONNX model: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def apply_onnx(data: bytes, patches: Sequence[spec.LoadedPatch], *, input_shape: tuple[int, int, int, int],
               what: str, check: bool = True, snapshot: Optional[Snapshot] = None,
               images: Optional[Any] = None) -> tuple[bytes, list[dict[str, Any]]]:
    """Apply ``patches`` in order to ONNX bytes; returns (patched bytes, one record per patch).

    After each patch the model goes through the onnx checker, strict shape inference and onnxruntime
    runs on ``images`` (the stage's self-check images; person-like ones when None) (``check``); a patch
    that breaks the graph raises StageFailed naming the patch.
    """
    from . import onnx_ops

    source = load_onnx(data, what)
    model = load_onnx(data, what)
    records = []
    for i, lp in enumerate(patches):
        if lp.format != "onnx":
            raise PatchError(f"{lp.where('format')}: format: this patch is for {lp.format} graphs, not ONNX")
        before = onnx_ops.listing(model) if snapshot else ""
        ops = onnx_ops.apply_patch(model, lp, what)
        if check:
            try:
                onnx_ops.check_model(model, input_shape, what, source=source, images=images)
            except StageFailed as exc:
                raise StageFailed(f"patch {lp.path} broke the graph: {exc}") from None
        if snapshot:
            snapshot(lp, before, onnx_ops.listing(model))
        records.append(patch_record(i, lp, ops))
    if check and patches:
        _check_declared_input(model, patches, what)
    return model.SerializeToString(deterministic=True), records


def _check_declared_input(model: Any, patches: Sequence[spec.LoadedPatch], what: str) -> None:
    """A patch declaring changes_input must leave the graph with that input (parity feeds it so)."""
    import onnx

    layout = input_layout(patches)
    if layout != spec.DEFAULT_INPUT_LAYOUT:
        init = {t.name for t in model.graph.initializer}
        ins = [v for v in model.graph.input if v.name not in init]
        ok = (len(ins) == 1 and ins[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
              and len(ins[0].type.tensor_type.shape.dim) == 4
              and ins[0].type.tensor_type.shape.dim[3].dim_value == 3)
        if not ok:
            raise StageFailed(f"{what}: the patches declare changes_input: {layout}, but the patched graph's "
                              "input is not uint8 [N, H, W, 3]")


# --------------------------------------------------------------------------------------------- Caffe


def apply_caffe(prototxt: str, caffemodel: Optional[bytes], patches: Sequence[spec.LoadedPatch], *, dialect: str,
                input_shape: Optional[tuple[int, int, int, int]], what: str, check: bool = True,
                snapshot: Optional[Snapshot] = None) -> tuple[str, Optional[bytes], list[dict[str, Any]]]:
    """Apply ``patches`` in order to a prototxt (+ caffemodel); returns (text, caffemodel bytes, records).

    After each patch the net is re-read with the dialect's schema and walked (``check``); a patch that
    breaks it raises StageFailed naming the patch. Weights follow their layers through renames.
    """
    from . import caffe_ops

    s = caffe_ops.schema()
    try:
        net = s.parse_prototxt(prototxt, dialect)
    except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
        raise StageFailed(f"{what}: cannot read the prototxt with the {dialect} schema: "
                          f"{str(exc).splitlines()[0]}") from None
    weights = None
    if caffemodel is not None:
        try:
            weights = s.parse_caffemodel(caffemodel, dialect)
        except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
            raise StageFailed(f"{what}: cannot read the caffemodel: {str(exc).splitlines()[0]}") from None
    weighted = {la.name for la in weights.layer if len(la.blobs)} if weights is not None else set()
    by_name = {la.name: la for la in weights.layer} if weights is not None else {}
    cn = caffe_ops.CaffeNet(net)
    text = s.net_to_text(net)
    records = []
    extra: tuple[str, ...] = ()
    for i, lp in enumerate(patches):
        if lp.format != "caffe":
            raise PatchError(f"{lp.where('format')}: format: this patch is for {lp.format} graphs, not Caffe")
        before = text
        ops = caffe_ops.apply_patch(cn, lp, what, input_shape)
        for op in lp.model.ops:  # after a conversion to bvlc the net must also read as stock BVLC Caffe
            if op.op == "convert_pooling_rounding":
                extra = ("bvlc",) if op.to == "bvlc" else ()
        try:
            net, text = caffe_ops.check_net(cn, what, input_shape, weighted, extra if dialect != "bvlc" else (),
                                            by_name)
        except StageFailed as exc:
            if check:
                raise StageFailed(f"patch {lp.path} broke the graph: {exc}") from None
            net = cn.materialize()
            text = s.net_to_text(net)
        if snapshot:
            snapshot(lp, before, text)
        records.append(patch_record(i, lp, ops))
    out_model = None
    if weights is not None:
        out_model = s.net_to_binary(caffe_ops.rebuild_caffemodel(cn, cn.materialize(), weights))
    return text, out_model, records


# ---------------------------------------------------------------------------------------------- diff


def _unified(before: str, after: str, name: str, patch: Path) -> str:
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"a/{name} (before {patch.name})",
                                        tofile=f"b/{name} (after {patch.name})", n=2))


def diff_onnx_patches(patch_paths: Sequence[Path], model_path: Path, *,
                      check_input_shape: Optional[tuple[int, int, int, int]] = None) -> list[tuple[Path, str]]:
    """Per patch, a unified diff of the ONNX node/edge listing before and after it (cumulative order).

    With ``check_input_shape`` every step is also checked like the stage does (slower: onnxruntime runs).
    """
    patches = spec.load_patches([Path(p) for p in patch_paths], "onnx")
    data = _read(Path(model_path))
    out: list[tuple[Path, str]] = []

    def snap(lp: spec.LoadedPatch, before: str, after: str) -> None:
        out.append((lp.path, _unified(before, after, Path(model_path).name, lp.path)))

    apply_onnx(data, patches, input_shape=check_input_shape or (1, 3, 1, 1), what=Path(model_path).name,
               check=check_input_shape is not None, snapshot=snap)
    return out


def diff_caffe_patches(patch_paths: Sequence[Path], prototxt_path: Path, *, dialect: str,
                       check_input_shape: Optional[tuple[int, int, int, int]] = None) -> list[tuple[Path, str]]:
    """Per patch, a unified diff of the prototxt text before and after it (cumulative order)."""
    patches = spec.load_patches([Path(p) for p in patch_paths], "caffe")
    try:
        text = Path(prototxt_path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{prototxt_path}: cannot read: {exc.strerror}") from None
    out: list[tuple[Path, str]] = []

    def snap(lp: spec.LoadedPatch, before: str, after: str) -> None:
        out.append((lp.path, _unified(before, after, Path(prototxt_path).name, lp.path)))

    apply_caffe(text, None, patches, dialect=dialect, input_shape=check_input_shape,
                what=Path(prototxt_path).name, check=True, snapshot=snap)
    return out


def diff_patches(fmt: str, patch_paths: Sequence[Path], sources: Sequence[Path], *, dialect: Optional[str] = None,
                 check_input_shape: Optional[tuple[int, int, int, int]] = None) -> list[tuple[Path, str]]:
    """``plan --diff``: per patch, (patch path, unified diff of the graph before/after that patch).

    ``sources`` are the stage's input artifacts: ``[model.onnx]`` or ``[net.prototxt, net.caffemodel]``
    (only the prototxt is read). Patches apply cumulatively, in order, exactly as the stage applies them.
    """
    if fmt == "onnx":
        return diff_onnx_patches(patch_paths, Path(sources[0]), check_input_shape=check_input_shape)
    if fmt == "caffe":
        if dialect is None:
            raise ValueError("diff_patches('caffe', ...) needs the dialect")
        proto = next((Path(p) for p in sources if str(p).endswith(".prototxt")), Path(sources[0]))
        return diff_caffe_patches(patch_paths, proto, dialect=dialect, check_input_shape=check_input_shape)
    raise ValueError(f"unknown patch format {fmt!r}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: not found (build it first: the diff needs the graph the patches apply to)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None


# -------------------------------------------------------------------------------- declared side effects


def _loaded(patch_files: Sequence[Any]) -> list[spec.LoadedPatch]:
    return [p if isinstance(p, spec.LoadedPatch) else spec.load_patch(Path(p)) for p in patch_files]


def output_transforms(patch_files: Sequence[Any]) -> list[str]:
    """What the patches declare they do to the features (``changes_output``), in patch order.

    Parity applies these to the PyTorch reference with :func:`apply_output_transform`.
    """
    return [lp.model.changes_output for lp in _loaded(patch_files) if lp.model.changes_output]


def apply_output_transform(name: str, features: Any) -> Any:
    """Apply one declared output transform to reference features float32 [N, D]."""
    import numpy as np

    f = np.asarray(features, dtype=np.float32)
    if name == "l2_normalize":
        norm = np.linalg.norm(f, axis=-1, keepdims=True)
        return (f / np.maximum(norm, np.float32(1e-12))).astype(np.float32)
    raise ValueError(f"unknown output transform {name!r} (known: {', '.join(spec.OUTPUT_TRANSFORMS)})")


def input_layout(patch_files: Sequence[Any]) -> str:
    """The graph input the patches leave: ``float32_nchw`` (unchanged) or ``uint8_bgr_nhwc``."""
    layouts = [lp.model.changes_input for lp in _loaded(patch_files) if lp.model.changes_input]
    if len(layouts) > 1:
        raise PatchError(f"{len(layouts)} patches declare changes_input; the input can change only once")
    return layouts[0] if layouts else spec.DEFAULT_INPUT_LAYOUT


def adapt_input(layout: str, batch: Any, color: str = "RGB") -> Any:
    """Turn a float32 [N,3,H,W] 0..255 batch (channel order ``color``) into what a patched graph takes."""
    import numpy as np

    if layout == spec.DEFAULT_INPUT_LAYOUT:
        return np.ascontiguousarray(batch, dtype=np.float32)
    if layout == "uint8_bgr_nhwc":
        x = np.asarray(batch)
        if color == "RGB":
            x = x[:, ::-1]
        return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
    raise ValueError(f"unknown input layout {layout!r}")
