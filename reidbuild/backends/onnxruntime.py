"""onnxruntime (CPU) runner for ONNX artifacts, including fp16 and Q/DQ int8 graphs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import StageFailed
from .base import Lifecycle


def session_options() -> Any:
    """CPU session settings: no busy-spinning threads (spinning wrecked latency under load on 2 cores), and
    as many threads as ``OMP_NUM_THREADS`` allows, like PyTorch (onnxruntime ignores that variable itself, so
    parallel builds - ``apply --jobs``, Ray tasks - would otherwise each start one thread per core)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return so


class OnnxRuntimeRunner(Lifecycle):
    """Runs an ONNX file; ``adapt`` turns the standard float32 NCHW batch into what the graph takes
    (e.g. uint8 BGR NHWC after a graph patch changed the input)."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, adapt: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(model_path), session_options(),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise StageFailed(f"{model_path}: onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
        self.path = Path(model_path)
        self.adapt = adapt or (lambda b: np.ascontiguousarray(b, dtype=np.float32))
        self.input_name = self.session.get_inputs()[0].name
        outs = self.session.get_outputs()
        self.output_name = next((o.name for o in outs if o.name == "output"), outs[0].name)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: self.adapt(batch)}
        try:
            (out,) = self.session.run([self.output_name], feed)
        except Exception as exc:  # noqa: BLE001 - a third-party library's own errors, reported as StageFailed
            raise StageFailed(f"{self.path.name}: onnxruntime failed: {str(exc).splitlines()[0]}") from None
        return np.asarray(out, dtype=np.float32).reshape(len(batch), -1)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"runtime": "onnxruntime", "version": ort.__version__, "device": "cpu"}

    def close(self) -> None:
        """Drop the session (its arena and threads go with it)."""
        self.session = None


def adapt_input(batch: np.ndarray, elem_type: str, shape: list[Any]) -> np.ndarray:
    """Feed a float32 RGB NCHW 0..255 batch to a graph by its declared input type (uint8 NHWC: BGR bytes)."""
    if elem_type == "tensor(uint8)":
        if len(shape) == 4 and shape[-1] == 3:
            return np.ascontiguousarray(np.clip(np.rint(batch[:, ::-1].transpose(0, 2, 3, 1)), 0, 255), dtype=np.uint8)
        return np.asarray(np.clip(np.rint(batch), 0, 255), dtype=np.uint8)
    if elem_type == "tensor(float16)":
        return batch.astype(np.float16)
    return np.ascontiguousarray(batch, dtype=np.float32)
