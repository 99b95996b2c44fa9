"""The TensorRT engine stage: ``<name>.engine`` and its timing cache from the (precision) ONNX.

Engines are not bit-reproducible (tactic timing), so the stage is ``reproducible=False``: the lock keeps the
engine's hash and, in the record's ``environment``, the TensorRT version, GPU, compute capability and CUDA versions
it is tied to; ``reidbuild.tensorrt.engine_env_mismatch`` turns a different machine into a clear message.
The timing cache is kept as an artifact and fed back into the next build, so rebuilds skip tactic timing.
"""
from __future__ import annotations

from typing import Any

from ..pipeline import Stage, StageContext, StageResult
from ..targets.tensorrt import TensorRTTarget
from . import ArtifactRef

RECIPE = "trt-strongly-typed-v1"


def engine_stage(target: TensorRTTarget, source: ArtifactRef, name: str) -> Stage:
    """``tensorrt.engine`` from ``source``; outputs: the engine, its timing cache."""
    from ..tensorrt import build as trt_build
    from ..tensorrt import env as trt_env

    engine_file, cache_file = f"{name}.engine", f"{name}.timing.cache"
    settings = trt_build.EngineSettings(batch_size=target.batch_size, workspace_mib=target.workspace_mib,
                                        height=target.height, width=target.width)

    def run(ctx: StageContext) -> StageResult:
        onnx_bytes = ctx.artifact(source.file).read_bytes()
        previous = ctx.artifact(cache_file)
        cache = previous.read_bytes() if previous.is_file() and not previous.is_symlink() else None
        built = trt_build.build_engine(onnx_bytes, settings, timing_cache=cache, log=ctx.log,
                                       progress=lambda phase, d, t: ctx.progress(f"engine build: {phase}", d, t))
        record = dict(built.record)
        record["source"] = source.file
        record["mode"] = target.mode
        return StageResult({engine_file: built.engine, cache_file: built.timing_cache}, record)

    return Stage(
        "tensorrt.engine", run,
        params={"mode": target.mode, "batch_size": target.batch_size, "workspace_mib": target.workspace_mib,
                "input": [target.height, target.width], "profile": {"min": 1, "opt": target.batch_size,
                                                                    "max": target.batch_size},
                "recipe": RECIPE, "source": source.file},
        deps=(source.stage,), outputs=(engine_file, cache_file), tools=("tensorrt",),
        available=trt_env.available, reproducible=False, environment=_engine_env,
        placement={"gpu": target.gpu} if target.gpu else {},
        description=f"build the TensorRT {target.mode} engine (strongly typed)")


def _engine_env() -> dict[str, Any]:
    """What the engine bytes are tied to here (part of its shared-cache key)."""
    from ..tensorrt.env import engine_env

    return engine_env()


__all__ = ["engine_stage", "ArtifactRef"]
