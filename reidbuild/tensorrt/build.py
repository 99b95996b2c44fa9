"""Build a serialized TensorRT engine from ONNX bytes with a strongly typed network (TensorRT 10 and 11).

No precision flags exist in this path: fp16 comes from the fp16 ONNX's own types, int8 from its Q/DQ nodes
(TensorRT 11 removed BuilderFlag.FP16/INT8 and the calibrators). TF32 is switched off so float32 layers
compute what onnxruntime checked on the CPU. The ``trt`` module is a parameter so tests can pass a
recording stand-in; that checks the mapping from manifest to API calls, not TensorRT itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import NotExpressible, StageFailed
from .env import engine_env, import_tensorrt


@dataclass(frozen=True)
class EngineSettings:
    batch_size: int            # optimisation profile opt and max batch (min is 1)
    workspace_mib: int = 1024
    height: Optional[int] = None  # only needed when the ONNX leaves H/W dynamic
    width: Optional[int] = None


@dataclass
class EngineBuild:
    engine: bytes
    timing_cache: bytes
    record: dict[str, Any] = field(default_factory=dict)


class _Log:
    """Collects TensorRT's messages (errors are quoted in failures); a subclass of trt.ILogger at runtime."""

    @staticmethod
    def make(trt: Any, sink: Optional[Callable[[str], None]]) -> Any:
        class Logger(trt.ILogger):  # type: ignore[misc]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors.append(str(msg))
                    if sink:
                        sink(f"TensorRT error: {msg}")
                elif severity == trt.ILogger.Severity.WARNING and sink:
                    sink(f"TensorRT warning: {msg}")

        return Logger()


def _parser_errors(parser: Any) -> list[str]:
    out = []
    for i in range(int(parser.num_errors)):
        e = parser.get_error(i)
        parts = []
        node = getattr(e, "node", None)
        if callable(node) and node() >= 0:
            where = f"node {node()}"
            for attr in ("node_name", "node_operator"):
                f = getattr(e, attr, None)
                if callable(f) and f():
                    where += f" {f()}" if attr == "node_name" else f" ({f()})"
            parts.append(where)
        desc = e.desc() if callable(getattr(e, "desc", None)) else str(e)
        parts.append(str(desc))
        out.append(": ".join(parts))
    return out


def _dims(shape: Any) -> list[int]:
    return [int(d) for d in shape]


def progress_monitor(trt: Any, progress: Optional[Callable[[str, int, int], None]]) -> Any:
    """A TensorRT IProgressMonitor (TensorRT >= 10) forwarding its top-level build phases' steps, or None."""
    base: Any = getattr(trt, "IProgressMonitor", None)
    if progress is None or base is None:
        return None
    report = progress  # the non-None callback, for the class body

    class Monitor(base):  # type: ignore[misc]
        def __init__(self) -> None:
            base.__init__(self)
            self.totals: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            if parent_phase is None:
                self.totals[phase_name] = int(num_steps)
                report(phase_name, 0, int(num_steps))

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name in self.totals:
                report(phase_name, int(step) + 1, self.totals[phase_name])
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            self.totals.pop(phase_name, None)
    return Monitor()


def build_engine(onnx_bytes: bytes, settings: EngineSettings, *, timing_cache: Optional[bytes] = None,
                 trt: Any = None, log: Optional[Callable[[str], None]] = None,
                 env: Optional[dict[str, Any]] = None,
                 progress: Optional[Callable[[str, int, int], None]] = None) -> EngineBuild:
    """Parse ``onnx_bytes`` into a strongly typed network and build it; all failures are StageFailed."""
    trt = trt or import_tensorrt()
    say = log or (lambda _m: None)
    logger = _Log.make(trt, log)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # ignored (always on) in 11
    if strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = _parser_errors(parser) or logger.errors or ["the parser gave no reason"]
        raise StageFailed(f"TensorRT cannot parse the ONNX ({len(errors)} error(s)):\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mib) << 20)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)

    inputs = _add_input_profiles(builder, network, config, settings)
    cache_state = _set_timing_cache(config, timing_cache, say)

    monitor = progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor
    say(f"building the engine (batch 1..{settings.batch_size}, workspace {settings.workspace_mib} MiB)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "\n  ".join(logger.errors[-10:]) or "no error message from TensorRT"
        raise StageFailed(f"TensorRT could not build the engine:\n  {detail}")
    engine = bytes(memoryview(serialized))
    if env is None:
        try:
            env = engine_env(trt)
        except Exception as exc:  # noqa: BLE001 - a CUDA query failing after a successful build: say so, don't crash
            raise StageFailed(f"cannot read the CUDA/GPU environment to record with the engine: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
    record = {
        "builder": "TensorRT build_serialized_network, strongly typed network",
        "network_flags": ["STRONGLY_TYPED"] if strongly is not None else [],
        "tf32": False if tf32 is not None else "n/a",
        "workspace_mib": settings.workspace_mib,
        "inputs": inputs,
        "outputs": [{"name": network.get_output(i).name, "shape": _dims(network.get_output(i).shape)}
                    for i in range(int(network.num_outputs))],
        "layers": int(network.num_layers),
        "timing_cache": cache_state,
        "environment": env,
    }
    return EngineBuild(engine, cache_bytes, record)


def _fixed_item_dims(name: str, shape: list[int], settings: EngineSettings) -> list[int]:
    """An input's per-item dims with dynamic H/W filled from the manifest (channels first or last)."""
    rest = shape[1:]
    if not any(d < 0 for d in rest):
        return rest
    if settings.height is None or settings.width is None:
        raise NotExpressible(f"TensorRT input {name!r} has dynamic dims {shape} and the manifest gives no "
                             "targets.tensorrt.height/width to fix them")
    hw = [settings.height, settings.width]
    if rest[0] == 3 or (rest[0] < 0 and rest[-1] != 3):
        return [3 if rest[0] < 0 else rest[0], *hw]
    return [*hw, 3 if rest[-1] < 0 else rest[-1]]


def _add_input_profiles(builder: Any, network: Any, config: Any, settings: EngineSettings) -> list[dict[str, Any]]:
    """One optimisation profile for the network's dynamic inputs (batch 1..batch_size, H/W from the manifest);
    the inputs as the lock records them. A static batch must equal the manifest's batch size."""
    inputs: list[dict[str, Any]] = []
    profile = None
    for i in range(int(network.num_inputs)):
        t = network.get_input(i)
        shape = _dims(t.shape)
        if len(shape) != 4:
            raise NotExpressible(f"TensorRT input {t.name!r} has shape {shape}; expected [N, C, H, W] or [N, H, W, C]")
        rest = _fixed_item_dims(t.name, shape, settings)
        if shape[0] < 0:
            profile = profile or builder.create_optimization_profile()
            mn, opt, mx = [1, *rest], [settings.batch_size, *rest], [settings.batch_size, *rest]
            profile.set_shape(t.name, mn, opt, mx)
            inputs.append({"name": t.name, "shape": shape, "profile": {"min": mn, "opt": opt, "max": mx}})
            continue
        if shape[0] != settings.batch_size:
            raise NotExpressible(f"TensorRT input {t.name!r} has a static batch of {shape[0]} but "
                                 f"targets.tensorrt.batch_size is {settings.batch_size}; export with "
                                 "targets.onnx.dynamic_batch: true")
        if any(d < 0 for d in shape[1:]):
            profile = profile or builder.create_optimization_profile()
            fixed = [shape[0], *rest]
            profile.set_shape(t.name, fixed, fixed, fixed)
        inputs.append({"name": t.name, "shape": shape})
    if profile is not None:
        config.add_optimization_profile(profile)
    return inputs


def _set_timing_cache(config: Any, timing_cache: Optional[bytes], say: Callable[[str], None]) -> str:
    """Feed the previous build's timing cache back (a fresh one when it does not fit); its state for the lock."""
    cache = config.create_timing_cache(timing_cache or b"")
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return "reused" if timing_cache else "fresh"
    if not timing_cache:
        raise StageFailed("TensorRT refused an empty timing cache")
    say("the previous timing cache does not fit this TensorRT/GPU; starting a fresh one")
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return "mismatch: replaced"
