"""fast-reid models without fast-reid: config loading, a key-compatible Baseline, checkpoints.

reidbuild rebuilds the few fast-reid architectures it deploys instead of importing
fast-reid, which drags in training-only dependencies and loads configs unsafely.
Names are resolved lazily so reading a config (plan, a no-op apply) does not import torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "Baseline": "baseline", "build_model": "registry", "supported": "config",
    "init_random": "checkpoint", "is_training_only": "checkpoint", "load_weights": "checkpoint",
    "make_checkpoint": "checkpoint",
    "check_supported": "config", "load_config": "config",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
