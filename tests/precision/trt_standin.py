"""A RECORDING STAND-IN for the ``tensorrt`` module (and a host-memory stand-in for cuda-python's runtime).

It is not TensorRT: it builds nothing and runs no kernels. It records which TensorRT API calls reidbuild
makes, with which arguments, so tests can check the mapping from the manifest to the API. Passing tests
that use it do NOT count as engine verification; tests/gpu does that where TensorRT and a GPU exist.
"""
from __future__ import annotations

import ctypes
import enum
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class _ILogger:
    Severity = _Severity
    WARNING = _Severity.WARNING

    def __init__(self, *a: Any) -> None:
        pass


class _ParserError:
    def __init__(self, node: int, name: str, op: str, desc: str) -> None:
        self._n, self._name, self._op, self._desc = node, name, op, desc

    def node(self) -> int:
        return self._n

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op

    def desc(self) -> str:
        return self._desc


class StandInTensorRT:
    """``import tensorrt as trt`` look-alike. Configure ``input_shape``, ``parse_errors``, ``build_fails``."""

    __version__ = "11.4.0.standin"

    def __init__(self, input_shape=(-1, 3, 256, 128), output_shape=(-1, 512), parse_errors=(),
                 build_fails=False, cache_mismatch=False) -> None:
        self.calls: list[tuple] = []
        self.input_shape, self.output_shape = list(input_shape), list(output_shape)
        self.parse_errors, self.build_fails, self.cache_mismatch = list(parse_errors), build_fails, cache_mismatch
        rec = self.calls
        outer = self
        self.ILogger = _ILogger
        self.Logger = type("Logger", (_ILogger,), {})
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = SimpleNamespace(TF32="TF32")
        self.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

        class Tensor:
            def __init__(self, name: str, shape: list[int]) -> None:
                self.name, self.shape = name, shape

        class Network:
            num_layers = 42

            def __init__(self) -> None:
                self.inputs = [Tensor("input", outer.input_shape)]
                self.outputs = [Tensor("output", outer.output_shape)]

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            @property
            def num_outputs(self) -> int:
                return len(self.outputs)

            def get_input(self, i: int) -> Tensor:
                return self.inputs[i]

            def get_output(self, i: int) -> Tensor:
                return self.outputs[i]

        class Parser:
            def __init__(self, network: Network, logger: Any) -> None:
                rec.append(("OnnxParser", type(network).__name__))

            def parse(self, data: bytes) -> bool:
                rec.append(("parse", len(data)))
                return not outer.parse_errors

            @property
            def num_errors(self) -> int:
                return len(outer.parse_errors)

            def get_error(self, i: int) -> _ParserError:
                return _ParserError(*outer.parse_errors[i])

        class Cache:
            def __init__(self, blob: bytes) -> None:
                self.blob = blob

            def serialize(self) -> bytes:
                return b"CACHE:" + self.blob

        class Config:
            def __init__(self) -> None:
                self.cache: Optional[Cache] = None

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                rec.append(("set_memory_pool_limit", pool, size))

            def clear_flag(self, flag: str) -> None:
                rec.append(("clear_flag", flag))

            def set_flag(self, flag: str) -> None:  # must never be called: no precision flags
                rec.append(("set_flag", flag))

            def create_timing_cache(self, blob: bytes) -> Cache:
                rec.append(("create_timing_cache", bytes(blob)))
                return Cache(bytes(blob))

            def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
                rec.append(("set_timing_cache", cache.blob, ignore_mismatch))
                if outer.cache_mismatch and cache.blob:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self) -> Cache:
                return self.cache

            def add_optimization_profile(self, profile: Any) -> int:
                rec.append(("add_optimization_profile",))
                return 0

        class Profile:
            def set_shape(self, name: str, mn: list, opt: list, mx: list) -> None:
                rec.append(("set_shape", name, list(mn), list(opt), list(mx)))

        class Builder:
            def __init__(self, logger: Any) -> None:
                rec.append(("Builder",))

            def create_network(self, flags: int) -> Network:
                rec.append(("create_network", flags))
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> Optional[bytes]:
                rec.append(("build_serialized_network",))
                return None if outer.build_fails else b"ENGINE"

        self.Builder, self.OnnxParser = Builder, Parser

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


# ------------------------------------------------------------------------------------- runner stand-ins

class StandInEngine:
    """Deserialized 'engine' whose execution copies ``out_dim`` values of each input image to the output."""

    def __init__(self, trt: "RunnerTensorRT", item_shape: tuple[int, ...], out_dim: int, max_batch: int) -> None:
        self.trt, self.item_shape, self.out_dim, self.max_batch = trt, tuple(item_shape), out_dim, max_batch
        self.num_io_tensors = 2

    def get_tensor_name(self, i: int) -> str:
        return ["input", "output"][i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "input" else "OUTPUT"

    def get_tensor_shape(self, name: str) -> tuple:
        return (-1, *self.item_shape) if name == "input" else (-1, self.out_dim)

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        return ((1, *self.item_shape), (self.max_batch, *self.item_shape), (self.max_batch, *self.item_shape))

    def get_tensor_dtype(self, name: str) -> str:
        return "float32"

    def create_execution_context(self) -> "StandInContext":
        return StandInContext(self)


class StandInContext:
    def __init__(self, engine: StandInEngine) -> None:
        self.engine, self.shape, self.addr = engine, None, {}
        self.calls = engine.trt.calls

    def set_input_shape(self, name: str, shape: list) -> bool:
        self.calls.append(("set_input_shape", name, list(shape)))
        if shape[0] > self.engine.max_batch:
            return False
        self.shape = list(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        return tuple(self.shape) if name == "input" else (self.shape[0], self.engine.out_dim)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.calls.append(("set_tensor_address", name))
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.calls.append(("execute_async_v3", self.shape[0]))
        n, per = self.shape[0], int(np.prod(self.engine.item_shape))
        for i in range(n):  # output[i, :D] = input[i].ravel()[:D], as 'device' copies
            self.engine.trt.copy(self.addr["output"] + 4 * i * self.engine.out_dim,
                                 self.addr["input"] + 4 * i * per, 4 * self.engine.out_dim, stream)
        return True


class RunnerTensorRT:
    """Runtime-side stand-in: Logger, Runtime.deserialize_cuda_engine, TensorIOMode, nptype."""

    __version__ = "11.4.0.standin"
    TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    def __init__(self, item_shape=(3, 8, 4), out_dim=16, max_batch=4,
                 copy: Optional[Callable[[int, int, int, Any], None]] = None) -> None:
        self.calls: list[tuple] = []
        self.copy = copy or (lambda dst, src, n, stream: ctypes.memmove(dst, src, n))
        outer = self

        class Logger:
            WARNING = 2

            def __init__(self, *a: Any) -> None:
                pass

        class Runtime:
            def __init__(self, logger: Any) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> Optional[StandInEngine]:
                outer.calls.append(("deserialize_cuda_engine", bytes(data)))
                return None if data == b"BROKEN" else StandInEngine(outer, item_shape, out_dim, max_batch)

        self.Logger, self.Runtime = Logger, Runtime

    @staticmethod
    def nptype(dtype: str) -> type:
        return {"float32": np.float32}[dtype]


class HostCudart:
    """cuda-python runtime look-alike backed by host memory (ctypes buffers); records every call."""

    class cudaMemcpyKind(enum.IntEnum):  # mirrors cuda-python's name
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.live: dict[int, Any] = {}

    def cudaSetDevice(self, d: int):
        self.calls.append(("cudaSetDevice", d))
        return (0,)

    def cudaMalloc(self, n: int):
        buf = ctypes.create_string_buffer(n)
        self.live[ctypes.addressof(buf)] = buf
        self.calls.append(("cudaMalloc", n))
        return (0, ctypes.addressof(buf))

    def cudaFree(self, p: int):
        self.live.pop(p, None)
        self.calls.append(("cudaFree",))
        return (0,)

    def cudaStreamCreate(self):
        return (0, 7)

    def cudaStreamDestroy(self, s: int):
        return (0,)

    def cudaStreamSynchronize(self, s: int):
        self.calls.append(("cudaStreamSynchronize",))
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: Any, stream: int):
        ctypes.memmove(dst, src, n)
        self.calls.append(("cudaMemcpyAsync", kind.name, n))
        return (0,)

    def cudaGetDeviceCount(self):
        return (0, 1)

    def cudaGetDeviceProperties(self, d: int):
        return (0, SimpleNamespace(name=b"Stand-in GPU\0\0", major=9, minor=0))

    def cudaRuntimeGetVersion(self):
        return (0, 12080)

    def cudaDriverGetVersion(self):
        return (0, 13000)
