"""The model sources reidbuild can build from, by the manifest's ``source.format``.

This module is the one place a source is registered. Built in: ``fastreid`` (a fast-reid config and
checkpoint; with ``source.model_code`` the user's own fast-reid code builds it). A new format is one module with
a ``SourceSpec`` and a ``ModelSource`` subclass, plus one ``register`` call here (or from a test or a plugin
that imports ``reidbuild.sources``); the manifest then accepts its section and every stage uses it.
"""
from __future__ import annotations

from typing import get_args

from ..manifest import LoadedManifest, SourceSpec
from .base import ModelSource
from .fastreid import FastReidSource

__all__ = ["ModelSource", "formats", "open_source", "register", "spec_types", "unregister"]

_SOURCES: dict[str, type[ModelSource]] = {}


def register(source: type[ModelSource]) -> type[ModelSource]:
    """Make ``source`` selectable by its ``format`` (usable as a class decorator)."""
    declared = get_args(source.spec.model_fields["format"].annotation)
    if declared != (source.format,):
        raise ValueError(f"{source.__name__}: its spec's format must be Literal[{source.format!r}], got {declared}")
    known = _SOURCES.get(source.format)
    if known is not None and known is not source:
        raise ValueError(f"source format {source.format!r} is already registered by {known.__name__}")
    _SOURCES[source.format] = source
    return source


def unregister(fmt: str) -> None:
    """Forget the source registered for ``fmt`` (a test's own source, once the test is done)."""
    _SOURCES.pop(fmt, None)


def formats() -> tuple[str, ...]:
    """The registered formats, in registration order (built-ins first)."""
    return tuple(_SOURCES)


def spec_types() -> tuple[type[SourceSpec], ...]:
    """The manifest section model of every registered source (what ``source`` may be)."""
    return tuple(s.spec for s in _SOURCES.values())


def open_source(lm: LoadedManifest) -> ModelSource:
    """The model source ``lm`` declares, opened: its own files are read and checked now (plan time)."""
    return _SOURCES[lm.model.source.format].open(lm)


register(FastReidSource)
