"""What both formats' ops share: error reporting for one op of one patch, and selector cardinality rules."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from ..errors import PatchError
from . import spec


class OpContext:
    """The patch, the op index and the artifact under edit, so every error names all three."""

    noun = "node"  # what a selector picks in this format ("node" in ONNX, "layer" in Caffe)

    def __init__(self, lp: spec.LoadedPatch, index: int, what: str,
                 input_shape: Optional[tuple[int, ...]] = None) -> None:
        self.lp, self.index, self.what, self.input_shape = lp, index, what, input_shape
        self.op = lp.model.ops[index]

    @property
    def label(self) -> str:
        return self.lp.op_label(self.index)

    def fail(self, msg: str) -> PatchError:
        return PatchError(f"{self.label}: {msg}")

    def no_match(self, sel: Optional[spec.Selector], extra: str = "") -> PatchError:
        s = f"select {sel.describe()} matched no {self.noun}" if sel is not None else "matched nothing"
        return self.fail(f"{s} in {self.what}{extra}; add 'optional: true' to the op if that is expected")

    def one(self, found: Sequence[Any], sel: spec.Selector, label: Callable[[Any], str]) -> Optional[Any]:
        """Exactly one match (None when nothing matched and the op is optional)."""
        if not found:
            if self.op.optional:
                return None
            raise self.no_match(sel)
        if len(found) > 1:
            names = ", ".join(label(x) for x in found[:5]) + (", ..." if len(found) > 5 else "")
            raise self.fail(f"select {sel.describe()} matched {len(found)} {self.noun}s ({names}); {self.op.op} "
                            "needs exactly one: narrow the selector")
        return found[0]

    def some(self, found: Sequence[Any], sel: spec.Selector) -> list[Any]:
        """At least one match (an empty list only when the op is optional)."""
        if not found and not self.op.optional:
            raise self.no_match(sel)
        return list(found)
