"""infer: run one backend's built artifacts on images and save one feature file per image (.npy)."""
from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import Any

import numpy as np

from . import lockfile
from .backends.base import Runner, run_batched
from .errors import CheckFailed, ImageError, InputError
from .fsutil import atomic_write, ensure_dir, sha256_file
from .manifest import LoadedManifest

# which artifacts each backend runs, by lock stage
_BACKEND_STAGE = {"onnxruntime": ("onnx.patch", "onnx.simplify", "onnx.export"), "caffe": ("caffe.patch", "caffe.convert"),
                  "tensorrt": ("tensorrt.engine",), "onnx_fp16": ("precision.fp16",), "onnx_int8": ("precision.int8",)}


def _artifacts(lm: LoadedManifest, backend: str) -> list[Path]:
    lock = lockfile.read(lm.lock_path)
    if lock is None:
        raise CheckFailed(f"{lm.lock_path}: no lock; run `reidbuild apply` first")
    for stage in _BACKEND_STAGE[backend]:
        rec = lock.stages.get(stage)
        if rec is None or rec.status != "ok":
            continue
        paths = []
        for fname, entry in sorted(rec.outputs.items()):
            path = lm.output_dir / fname
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise CheckFailed(f"{path}: artifact is missing or differs from the lock; run `reidbuild apply`")
            paths.append(path)
        return paths
    raise InputError(f"{lm.path}: no built artifact for backend {backend}; is it a target, and did apply run?")


def make_runner(lm: LoadedManifest, backend: str) -> Runner:
    if backend == "torch":
        from .backends.torch import TorchRunner
        from .stages.load import _model_cfg, build_torch_model

        return TorchRunner(build_torch_model(lm, _model_cfg(lm)))
    paths = _artifacts(lm, backend)
    if backend in ("onnxruntime", "onnx_fp16", "onnx_int8"):
        from .backends.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(next(p for p in paths if p.suffix == ".onnx"))
    if backend == "caffe":
        from .backends import caffe

        why = caffe.available("auto")
        if why:
            from .errors import Unavailable

            raise Unavailable(why)
        proto = next(p for p in paths if p.suffix == ".prototxt")
        model = next(p for p in paths if p.suffix == ".caffemodel")
        return caffe.CaffeRunner(proto, model, runtime="auto")
    from .backends import tensorrt

    why = tensorrt.available()
    if why:
        from .errors import Unavailable

        raise Unavailable(why)
    return tensorrt.TensorRTRunner(next(p for p in paths if p.suffix == ".engine"))


def run_infer(lm: LoadedManifest, backend: str, pattern: str, out_dir: Path, batch_size: int) -> list[Path]:
    from .images import load_images

    paths = sorted(Path(p).resolve() for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise ImageError(f"--input {pattern!r} matches no file")
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise InputError(f"--input: {p} and {stems[p.stem]} would both write {p.stem}.npy")
        stems[p.stem] = p
    inp = lm.model.input
    runner = make_runner(lm, backend)
    ensure_dir(out_dir)
    written = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i: i + batch_size]
        feats = run_batched(runner, load_images(chunk, inp.height, inp.width, inp.color, inp.interpolation), batch_size)
        for p, f in zip(chunk, feats):
            buf = io.BytesIO()
            np.save(buf, f.astype(np.float32))
            written.append(atomic_write(out_dir, f"{p.stem}.npy", buf.getvalue()))
    return written
