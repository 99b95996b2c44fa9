"""TensorRT engines from (precision) ONNX: strongly typed builds, timing cache, and the environment an
engine is tied to. Nothing here decides numerics: the ONNX graph's own types and Q/DQ nodes do."""
from __future__ import annotations

from .build import EngineBuild, EngineSettings, build_engine
from .env import available, engine_env, engine_env_mismatch

__all__ = ["EngineBuild", "EngineSettings", "available", "build_engine", "engine_env", "engine_env_mismatch"]
