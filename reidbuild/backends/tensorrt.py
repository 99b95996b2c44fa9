"""TensorRT engine runner: cuda-python buffers and stream, ``execute_async_v3``, any batch size.

Device buffers are sized once for the engine profile's max batch; a larger batch is run in chunks. Inputs
are float32 NCHW RGB 0..255 like every runner (converted to the engine's input dtype/layout if a graph
patch changed it). ``trt``/``cudart`` can be injected for tests with stand-ins.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from ..errors import StageFailed, Unavailable
from ..tensorrt.env import available, cuda_result, engine_env, import_cudart, import_tensorrt
from .base import Lifecycle

__all__ = ["TensorRTRunner", "available"]


class TensorRTRunner(Lifecycle):
    name = "tensorrt"

    def __init__(self, engine: Union[Path, str, bytes], *, device: int = 0, trt: Any = None,
                 cudart: Any = None, adapt: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> None:
        if trt is None or cudart is None:
            why = available()
            if why:
                raise Unavailable(why)
        self.trt = trt or import_tensorrt()
        self.cudart = cudart or import_cudart()
        self.device = device
        self.adapt = adapt  # standard float32 NCHW batch -> what the engine's input takes (graph patches)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.stream: Any = None  # a cudaStream_t once the engine is loaded
        data = engine if isinstance(engine, bytes) else Path(engine).read_bytes()
        self.path = None if isinstance(engine, bytes) else Path(engine)
        self._call(self.cudart.cudaSetDevice(device), "cudaSetDevice")
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise StageFailed(f"{self.path or 'engine'}: TensorRT cannot deserialize the engine (built with another "
                              "TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(int(self.engine.num_io_tensors))]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not outputs:
            raise StageFailed(f"expected one input and at least one output, got inputs {inputs}, outputs {outputs}")
        self.input_name = inputs[0]
        self.output_name = "output" if "output" in outputs else outputs[0]
        self.outputs = outputs
        shape = [int(d) for d in self.engine.get_tensor_shape(self.input_name)]
        self.input_shape = shape
        if shape[0] < 0:
            _mn, _opt, mx = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.max_batch = int(mx[0])
            self.item_shape = [int(d) for d in mx[1:]]
        else:
            self.max_batch = shape[0]
            self.item_shape = shape[1:]
        self.input_dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.stream = self._call(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        # allocate for the max batch: input from its profile shape, outputs from the context at that shape
        self._call_bool(self.context.set_input_shape(self.input_name, [self.max_batch, *self.item_shape]),
                        "set_input_shape")
        self._alloc(self.input_name, self.max_batch * int(np.prod(self.item_shape)) * self.input_dtype.itemsize)
        self.output_dtypes = {}
        for o in outputs:
            oshape = [int(d) for d in self.context.get_tensor_shape(o)]
            dt = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(o)))
            self.output_dtypes[o] = dt
            self._alloc(o, int(np.prod(oshape)) * dt.itemsize)
        for n, (ptr, _size) in self._buffers.items():
            self._call_bool(self.context.set_tensor_address(n, ptr), "set_tensor_address")

    # -------------------------------------------------------------------------------------- helpers
    def _call(self, result: Any, what: str) -> Any:
        try:
            return cuda_result(result, what)
        except RuntimeError as exc:
            raise StageFailed(f"CUDA: {exc}") from None

    @staticmethod
    def _call_bool(ok: Any, what: str) -> None:
        if ok is False:
            raise StageFailed(f"TensorRT {what} failed")

    def _alloc(self, name: str, nbytes: int) -> None:
        ptr = self._call(self.cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc")
        self._buffers[name] = (int(ptr), int(nbytes))

    def _adapt(self, batch: np.ndarray) -> np.ndarray:
        if self.adapt is not None:
            return np.ascontiguousarray(self.adapt(batch), dtype=self.input_dtype)
        from .onnxruntime import adapt_input

        kind = {np.dtype(np.uint8): "tensor(uint8)", np.dtype(np.float16): "tensor(float16)"}.get(
            self.input_dtype, "tensor(float)")
        return np.ascontiguousarray(adapt_input(batch, kind, [None, *self.item_shape]), dtype=self.input_dtype)

    # ------------------------------------------------------------------------------------------ API
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] (RGB, 0..255) -> float32 [N, D]; N may exceed the engine's max batch."""
        batch = np.asarray(batch, dtype=np.float32)
        outs = [self._infer_chunk(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return np.concatenate(outs, axis=0) if outs else np.zeros((0, 0), np.float32)

    def _infer_chunk(self, chunk: np.ndarray) -> np.ndarray:
        cr = self.cudart
        host_in = self._adapt(chunk)
        n = len(host_in)
        if self.input_shape[0] >= 0 and n != self.max_batch:  # static batch: pad with the last image
            pad = np.repeat(host_in[-1:], self.max_batch - n, axis=0)
            host_in = np.ascontiguousarray(np.concatenate([host_in, pad]))
        else:
            self._call_bool(self.context.set_input_shape(self.input_name, list(host_in.shape)), "set_input_shape")
        ptr, cap = self._buffers[self.input_name]
        if host_in.nbytes > cap:
            raise StageFailed(f"batch of {n} does not fit the engine's input buffer")
        self._call(cr.cudaMemcpyAsync(ptr, host_in.ctypes.data, host_in.nbytes,
                                      cr.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "cudaMemcpyAsync")
        oshape = [int(d) for d in self.context.get_tensor_shape(self.output_name)]
        host_out = np.empty(oshape, dtype=self.output_dtypes[self.output_name])
        if not self.context.execute_async_v3(int(self.stream)):
            raise StageFailed("TensorRT execute_async_v3 failed")
        optr, _ = self._buffers[self.output_name]
        self._call(cr.cudaMemcpyAsync(host_out.ctypes.data, optr, host_out.nbytes,
                                      cr.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "cudaMemcpyAsync")
        self._call(cr.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return host_out.reshape(len(host_out), -1)[:n].astype(np.float32)

    def describe(self) -> dict[str, Any]:
        try:
            env = engine_env(self.trt, self.cudart, self.device)
        except Exception:  # noqa: BLE001 - describe() must not fail a parity record
            env = {"tensorrt": str(getattr(self.trt, "__version__", "?"))}
        return {"runtime": "tensorrt", "version": env.get("tensorrt"), "device": env.get("gpu", "cuda"),
                "environment": env, "max_batch": self.max_batch}

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            try:
                self.cudart.cudaFree(ptr)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self._buffers = {}
        if self.stream is not None:
            try:
                self.cudart.cudaStreamDestroy(self.stream)
            except Exception:  # noqa: BLE001
                pass
            self.stream = None
        # the execution context goes before the engine it was made from
        self.context = None
        self.engine = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

