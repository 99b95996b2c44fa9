"""The input adapter: turn the standard batch into what a model's input takes. One concept, one place.

Every backend is fed float32 [N, 3, H, W] batches, RGB 0..255 (``images.py`` makes them). A model's input
may differ: a graph patch can change it to uint8 BGR NHWC bytes (declared in the patch, ``changes_input``),
and a reduced-precision ONNX may take float16. Both are described by a *layout* name, and
:func:`adapt_input` is the only code that converts a batch to a layout; :func:`graph_layout` names the
layout of a graph input from its declared element type and shape, for callers that know only the graph.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # numpy is imported where it is used: planning imports the layout names, not numpy
    import numpy as np

DEFAULT_LAYOUT = "float32_nchw"  # what backends feed when no patch changes the input
UINT8_BGR_NHWC = "uint8_bgr_nhwc"  # the layout a graph patch can declare (changes_input)
LAYOUTS = (DEFAULT_LAYOUT, UINT8_BGR_NHWC, "uint8_nchw", "float16_nchw")


def adapt_input(layout: str, batch: Any, color: str = "RGB") -> np.ndarray:
    """A float32 [N, 3, H, W] 0..255 batch (channel order ``color``) converted to ``layout``.

    uint8 layouts round to the nearest integer and clip to 0..255, as an image decoder would give them.
    """
    import numpy as np

    if layout == DEFAULT_LAYOUT:
        return np.ascontiguousarray(batch, dtype=np.float32)
    if layout == UINT8_BGR_NHWC:
        x = np.asarray(batch)
        if color == "RGB":
            x = x[:, ::-1]
        return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
    if layout == "uint8_nchw":
        return np.asarray(np.clip(np.rint(batch), 0, 255)).astype(np.uint8)
    if layout == "float16_nchw":
        return np.asarray(batch).astype(np.float16)
    raise ValueError(f"unknown input layout {layout!r} (known: {', '.join(LAYOUTS)})")


def graph_layout(elem_type: str, shape: Sequence[Any]) -> str:
    """The layout of a graph input declared as ``elem_type`` (onnxruntime's spelling, e.g. ``tensor(uint8)``)
    with ``shape``: uint8 with 3 trailing channels is BGR NHWC bytes (what the uint8 input patch makes)."""
    if elem_type == "tensor(uint8)":
        return UINT8_BGR_NHWC if len(shape) == 4 and shape[-1] == 3 else "uint8_nchw"
    if elem_type == "tensor(float16)":
        return "float16_nchw"
    return DEFAULT_LAYOUT
