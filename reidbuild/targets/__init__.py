"""The target registry: every build target reidbuild knows, registered here and only here.

The manifest's ``targets`` section, ``parity.backends`` and ``parity.overrides`` names, the CLI's ``infer
--backend`` choices, the tolerance profiles' check names and the plan itself are derived from it. Adding a
target is one new module exposing a :class:`~reidbuild.targets.base.Target` plus one ``register`` call
(in ``_BUILTIN`` below for a built-in target, or from a plugin's or test's own code).
"""
from __future__ import annotations

from pydantic import BaseModel

from .base import Artifact, BackendBuild, Build, RunnerFactory, Target, section

__all__ = ["Artifact", "BackendBuild", "Build", "RunnerFactory", "Target", "section", "register", "unregister",
           "registered", "generation", "backend_names", "requestable_backends", "precision_of"]

_REGISTRY: dict[str, Target] = {}
_GENERATION = [0]  # bumped on every change: the manifest model is rebuilt when it moves


def register(target: Target) -> Target:
    """Add ``target`` after those registered so far (its ``contribute`` runs after theirs)."""
    taken = set(backend_names())
    if not target.name.isidentifier() or hasattr(BaseModel, target.name):
        raise ValueError(f"target name {target.name!r} is not a usable section name (an identifier that is no "
                         "pydantic model attribute)")
    if target.name in _REGISTRY:
        raise ValueError(f"a target named {target.name!r} is already registered")
    clash = sorted(taken & set(target.backends))
    if clash:
        raise ValueError(f"target {target.name!r}: backend name(s) {clash} belong to another target")
    _REGISTRY[target.name] = target
    _GENERATION[0] += 1
    return target


def unregister(name: str) -> None:
    """Remove a target (tests that register a toy target clean up with this)."""
    del _REGISTRY[name]
    _GENERATION[0] += 1


def registered() -> tuple[Target, ...]:
    """Every target, in registration order (the order their stages join the plan)."""
    return tuple(_REGISTRY.values())


def generation() -> int:
    """A number that changes whenever the registry does."""
    return _GENERATION[0]


def backend_names() -> tuple[str, ...]:
    """Every runner name a target may declare: ``parity.overrides`` keys and ``infer --backend`` choices."""
    return tuple(b for t in _REGISTRY.values() for b in t.backends)


def requestable_backends() -> tuple[str, ...]:
    """The names a manifest may list under ``parity.backends``."""
    return tuple(b for t in _REGISTRY.values() for b in t.requestable)


def precision_of(backend: str) -> str:
    """The precision (fp32, fp16, int8) of ``backend``'s default tolerances; KeyError when unknown."""
    for t in _REGISTRY.values():
        if backend in t.backends:
            return t.backends[backend]
    raise KeyError(backend)


def _register_builtin() -> None:
    from . import caffe, onnx, onnx_int8_cpu, tensorrt

    for module in (onnx, caffe, tensorrt, onnx_int8_cpu):  # the order their stages join the plan
        register(module.TARGET)


_register_builtin()
