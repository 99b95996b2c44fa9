"""ONNX -> Caffe: a prototxt and a caffemodel that compute what the ONNX graph computes, by construction.

The simplified ONNX is the single source. Conversion first pins the batch (the prototxt has a fixed input
shape), folds every constant sub-graph (``Shape`` chains included) with onnx's reference evaluator, then maps
each remaining node to stock Caffe layers, tracking every blob's exact shape with Caffe's own formulas
(:mod:`reidbuild.caffe.shapes`, shared with the Caffe graph patches):

* Pooling rounding: PyTorch/ONNX round the output size down (``ceil_mode=0``), stock Caffe rounds up. The
  ``ceil_mode`` dialect writes the fork field (``ceil_mode: false``); the ``bvlc`` dialect has no such field,
  so where Caffe's ceil would produce an extra row/column the converter slices it off (a ``Slice`` layer whose
  tail goes to ``Silence``). The windows Caffe keeps start at the same positions as PyTorch's, so the values
  are the same, not approximately the same.
* Layers outside stock BVLC Caffe 1.0 are decomposed into stock layers that are exact in real arithmetic
  (e.g. InstanceNorm = MVN(mean only) -> square -> global AVE pool -> Power(-0.5, shift=eps) -> Scale, because
  Caffe's MVN adds eps to the standard deviation, not to the variance). What has no faithful equivalent raises
  ``NotExpressible`` naming the node, its op and the dialect.

Only layer types that both pycaffe (BVLC and forks) and OpenCV's Caffe importer run are emitted (no
``Reduction``, ``Tile``, ``Permute``, ``Bias``...), in both dialects.

The package, in the order a conversion runs: ``walk`` (the graph walk and the converter's building blocks),
``*_ops`` (op handlers by family: shape, elementwise, norm, spatial, linear; ``handlers`` is their table),
``passes`` (clean-up after the walk), ``emit`` (prototxt and caffemodel). ``net`` is the net they build.
"""
from __future__ import annotations

from .. import CONVERTER_VERSION
from .emit import Conversion, caffemodel_bytes, convert, convert_detailed, convert_file, prototxt_message, to_messages
from .handlers import HANDLERS, build_net

__all__ = ["CONVERTER_VERSION", "HANDLERS", "Conversion", "build_net", "caffemodel_bytes", "convert", "convert_detailed",
           "convert_file", "prototxt_message", "to_messages"]
