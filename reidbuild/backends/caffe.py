"""Caffe runners: pycaffe (the reference) and OpenCV's Caffe importer (no build needed, a second opinion).

Both load a ``.prototxt`` + ``.caffemodel`` whose input blob is ``input`` [N, 3, H, W] and whose output blob
is ``output``. ``runtime="auto"`` prefers pycaffe. OpenCV fuses layers (BatchNorm/Scale into convolutions,
...), so its features differ from pycaffe's by float rounding (~1e-5), never by structure.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import StageFailed, Unavailable
from .base import Lifecycle

RUNTIMES = ("auto", "pycaffe", "opencv")

_HOW = {"pycaffe": "pycaffe is not built: run `make pycaffe` (scripts/build_pycaffe.sh builds a CPU Caffe into "
                   ".cache/pycaffe and makes `import caffe` work in .venv)",
        "opencv": "OpenCV's Caffe importer is not installed: pip install 'opencv-python-headless<5'"}


def _quiet_glog() -> None:
    # glog reads this once, when libcaffe is loaded: must precede `import caffe`
    os.environ.setdefault("GLOG_minloglevel", "2")


def _import_caffe() -> Any:
    _quiet_glog()
    import caffe

    return caffe


def available(runtime: str = "auto") -> Optional[str]:
    """None when ``runtime`` can run here, else one line saying why not and how to install it."""
    if runtime not in RUNTIMES:
        return f"unknown Caffe runtime {runtime!r} (expected one of {', '.join(RUNTIMES)})"
    if runtime == "auto":  # each probe is an import: OpenCV is tried only when pycaffe is missing
        why_py = available("pycaffe")
        why_cv = available("opencv") if why_py is not None else None
        if why_py is None or why_cv is None:
            return None
        return f"no Caffe runtime: {why_py}; or {why_cv}"
    if runtime == "pycaffe":
        try:
            caffe = _import_caffe()
            caffe.Net  # noqa: B018  (a half-installed package has no Net)
        except Exception:  # noqa: BLE001 - a broken pycaffe install fails in any way
            return _HOW["pycaffe"]
        return None
    try:
        import cv2
    except Exception:  # noqa: BLE001 - a broken OpenCV install fails in any way
        return _HOW["opencv"]
    major = int(str(cv2.__version__).split(".")[0])
    if major >= 5 or not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        return f"OpenCV {cv2.__version__} has no Caffe importer: pip install 'opencv-python-headless<5'"
    return None


def resolve_runtime(runtime: str = "auto") -> str:
    """The concrete runtime ``runtime`` stands for here (auto: pycaffe if built, else OpenCV)."""
    why = available(runtime)
    if why is not None:
        raise Unavailable(why)
    if runtime != "auto":
        return runtime
    return "pycaffe" if available("pycaffe") is None else "opencv"


_INPUT_DIMS = re.compile(r'input_param\s*\{\s*shape\s*\{((?:\s*dim:\s*\d+)+)\s*\}', re.S)


def _net_facts(prototxt: Path) -> tuple[tuple[int, ...], str, bool]:
    """(input shape, name of the layer producing ``output``, whether every Reshape copies the batch)."""
    from ..caffe import schema

    text = prototxt.read_text()
    msg = None
    for dialect in ("ceil_mode", "bvlc"):  # ceil_mode's schema is a superset of bvlc's
        try:
            msg = schema.parse_prototxt(text, dialect)
            break
        except Exception:  # noqa: BLE001 - protobuf text parse errors: try the next dialect
            continue
    if msg is None:  # a net using fields reidbuild does not write: read what is needed by pattern
        m = _INPUT_DIMS.search(text)
        if m is None:
            raise StageFailed(f"{prototxt.name}: no Input layer with a shape found")
        return tuple(int(d) for d in re.findall(r"\d+", m.group(1))), "", False
    shape: tuple[int, ...] = ()
    out_layer = ""
    agnostic = True
    for layer in msg.layer:
        if layer.type == "Input" and "input" in layer.top:
            shape = tuple(layer.input_param.shape[0].dim)
        if "output" in layer.top:
            out_layer = layer.name
        if layer.type == "Reshape":
            dims = list(layer.reshape_param.shape.dim)
            if not dims or dims[0] != 0 or layer.reshape_param.axis != 0:
                agnostic = False
    if not shape:
        if list(msg.input) == ["input"] and msg.input_shape:
            shape = tuple(msg.input_shape[0].dim)
        else:
            raise StageFailed(f"{prototxt.name}: no Input layer with top 'input'")
    if not out_layer:
        raise StageFailed(f"{prototxt.name}: no layer produces the blob 'output'")
    return shape, out_layer, agnostic


class CaffeRunner(Lifecycle):
    """Runs a Caffe net with pycaffe or OpenCV; ``infer`` takes float32 [N, 3, H, W] RGB 0..255."""

    name = "caffe"

    def __init__(self, prototxt: Path, caffemodel: Path, runtime: str = "auto") -> None:
        self.prototxt, self.caffemodel = Path(prototxt), Path(caffemodel)
        self.runtime = resolve_runtime(runtime)
        for p in (self.prototxt, self.caffemodel):
            if not p.is_file():
                raise StageFailed(f"{p}: Caffe artifact not found")
        self.input_shape, self.output_layer, self.batch_agnostic = _net_facts(self.prototxt)
        if len(self.input_shape) != 4:
            raise StageFailed(f"{self.prototxt.name}: input shape {list(self.input_shape)} is not [N, C, H, W]")
        if self.runtime == "pycaffe":
            caffe = _import_caffe()
            caffe.set_mode_cpu()
            self.version = str(getattr(caffe, "__version__", "unknown"))
            self.field13 = _pycaffe_field13()
            _precheck_pycaffe(self.prototxt, self.caffemodel, self.field13)
            self.net = caffe.Net(str(self.prototxt), str(self.caffemodel), caffe.TEST)
        else:
            import cv2

            self.version = str(cv2.__version__)
            self.field13 = "ceil_mode"  # OpenCV's own caffe.proto has the fork field
            try:
                self.net = cv2.dnn.readNetFromCaffe(str(self.prototxt), str(self.caffemodel))
            except cv2.error as exc:
                raise StageFailed(f"{self.prototxt.name}: OpenCV cannot read the Caffe net: "
                                  f"{_cv_message(exc)}") from None
            self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
            self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        if self.runtime == "pycaffe":
            blob = self.net.blobs["input"]
            if tuple(blob.data.shape) != x.shape:
                blob.reshape(*x.shape)
                self.net.reshape()
            blob.data[...] = x
            self.net.forward()
            return np.array(self.net.blobs["output"].data, dtype=np.float32, copy=True)
        import cv2

        self.net.setInput(x)
        try:
            out = self.net.forward(self.output_layer) if self.output_layer else self.net.forward()
        except cv2.error as exc:
            raise StageFailed(f"{self.prototxt.name}: OpenCV failed to run the net: {_cv_message(exc)}") from None
        return np.asarray(out, dtype=np.float32)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.input_shape[1:]:
            raise StageFailed(f"{self.prototxt.name}: expects [N, {', '.join(map(str, self.input_shape[1:]))}] "
                              f"input, got {list(x.shape)}")
        n = len(x)
        if self.runtime == "pycaffe" and self.batch_agnostic and n > 1:
            # pycaffe keeps every layer's blobs for the whole batch (no reuse): an R50 at 256x128 holds ~80 MB
            # of them per image. Its layers compute each image on its own, so one at a time gives the same
            # features at a quarter of the peak memory of a batch of four.
            return np.concatenate([self._forward(x[i : i + 1]).reshape(1, -1) for i in range(n)])
        if self.batch_agnostic or n == self.input_shape[0]:
            return self._forward(x).reshape(n, -1)
        # the net's reshapes are written for its own batch: run it at that batch, padding the last chunk
        size = self.input_shape[0]
        outs = []
        for i in range(0, n, size):
            chunk = x[i : i + size]
            pad = size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
            outs.append(self._forward(chunk).reshape(size, -1)[: size - pad])
        return np.concatenate(outs)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "version": self.version, "device": "cpu",
                "backend": "pycaffe (Caffe CPU)" if self.runtime == "pycaffe" else "OpenCV dnn Caffe importer",
                # what PoolingParameter field 13 means to this runtime: which dialects it reads correctly
                "pooling_field_13": self.field13 or "absent"}

    def close(self) -> None:
        """Drop the net (pycaffe's blobs and weights, or OpenCV's)."""
        self.net = None


def _pycaffe_field13() -> str:
    """"ceil_mode" (fork bool), "round_mode" (BVLC master enum) or "" (stock BVLC 1.0) for this pycaffe."""
    try:
        from caffe.proto import caffe_pb2
    except Exception:  # noqa: BLE001 - a broken pycaffe install fails in any way
        return ""
    f = caffe_pb2.PoolingParameter.DESCRIPTOR.fields_by_number.get(13)
    return f.name if f is not None else ""


def _precheck_pycaffe(prototxt: Path, caffemodel: Path, field13: str) -> None:
    """Refuse here what would make libcaffe abort the whole process (glog CHECK) while loading."""
    text = prototxt.read_text()
    if re.search(r"\bceil_mode\s*:", text) and field13 != "ceil_mode":
        kind = "BVLC master (round_mode)" if field13 == "round_mode" else "stock BVLC (no rounding field)"
        raise StageFailed(f"{prototxt.name} uses the ceil_mode dialect but this pycaffe is {kind}: "
                          "run it with runtime opencv, or convert with dialect bvlc")
    try:
        from caffe.proto import caffe_pb2
        from google.protobuf import text_format
    except Exception:  # noqa: BLE001 - a broken pycaffe install fails in any way
        return
    try:
        text_format.Parse(text, caffe_pb2.NetParameter())
    except text_format.ParseError as exc:
        raise StageFailed(f"{prototxt.name}: this pycaffe cannot parse the prototxt: {exc}") from None
    try:
        caffe_pb2.NetParameter.FromString(caffemodel.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors, reported
        raise StageFailed(f"{caffemodel.name}: not a Caffe NetParameter: {str(exc).splitlines()[0]}") from None


def _cv_message(exc: Exception) -> str:
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    return lines[-1] if lines else type(exc).__name__
