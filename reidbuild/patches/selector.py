"""The selector engine both patch formats share: which nodes (ONNX) or layers (Caffe) a ``select`` picks.

A :class:`~reidbuild.patches.spec.Selector` means the same in both formats (every given key must hold);
only how to read a name, a type, the tensors written and read, and "produces a graph output" differs. Each
format describes its items with a :class:`Facts` and the matching rules live here, once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, TypeVar

from .spec import Selector

T = TypeVar("T")


@dataclass(frozen=True)
class Facts(Generic[T]):
    """How to read one item of a format. ``reads`` may be lazy (a generator): it is consulted only for
    ``consumer_of`` and stops at the first match."""

    name: Callable[[T], str]
    type: Callable[[T], str]
    writes: Callable[[T], Iterable[str]]
    reads: Callable[[T], Iterable[str]]
    is_last: Callable[[T], bool]


def matches(item: T, sel: Selector, facts: Facts[T], rx: "re.Pattern[str] | None" = None) -> bool:
    """Whether ``item`` satisfies every key of ``sel`` (``rx``: ``sel.regex`` compiled once by the caller)."""
    if sel.name is not None and facts.name(item) != sel.name:
        return False
    if sel.type is not None and facts.type(item) != sel.type:
        return False
    if rx is not None and not rx.fullmatch(facts.name(item)):
        return False
    if sel.producer_of is not None and sel.producer_of not in facts.writes(item):
        return False
    if sel.consumer_of is not None and sel.consumer_of not in facts.reads(item):
        return False
    return not (sel.last and not facts.is_last(item))


def select(items: Iterable[T], sel: Selector, facts: Facts[T]) -> list[T]:
    """Items matching every key of ``sel``, in graph order."""
    rx = re.compile(sel.regex) if sel.regex is not None else None
    return [item for item in items if matches(item, sel, facts, rx)]
