"""fast-reid models without fast-reid: config loading, a key-compatible Baseline, checkpoints.

reidbuild rebuilds the few fast-reid architectures it deploys instead of importing
fast-reid, which drags in training-only dependencies and loads configs unsafely.
"""
from __future__ import annotations

from .baseline import Baseline, build_model, supported
from .checkpoint import init_random, is_training_only, load_weights, make_checkpoint
from .config import check_supported, defaults, load_config

__all__ = [
    "Baseline",
    "build_model",
    "check_supported",
    "defaults",
    "init_random",
    "is_training_only",
    "load_config",
    "load_weights",
    "make_checkpoint",
    "supported",
]
