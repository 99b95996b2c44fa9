"""Op handlers for normalisation: inference BatchNorm (BatchNorm + Scale) and InstanceNorm (decomposed).

InstanceNorm = MVN(mean only) -> square -> global AVE pool -> Power(-0.5, shift=eps) -> Scale, because
Caffe's MVN adds eps to the standard deviation, not to the variance.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .net import attrs, f32
from .walk import Converter, Handler


def op_batch_normalization(cv: Converter, node: Any) -> None:
    """Inference BatchNorm as Caffe's BatchNorm (mean, variance, scale factor 1) then Scale (gamma, beta)."""
    a = attrs(node)
    if a.get("training_mode", 0):
        raise cv.refuse("training-mode batch normalisation")
    if any(o and cv.consumers.get(o) for o in node.output[1:]):
        raise cv.refuse("running statistics outputs are used")
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    gamma, beta, mean, var = (cv.const(n, w).astype(np.float32).reshape(-1) for n, w in
                              zip(node.input[1:5], ("scale", "bias", "mean", "variance")))
    if len(s) < 2 or any(v.size != s[1] for v in (gamma, beta, mean, var)):
        raise cv.refuse(f"batch normalisation parameters do not match channel axis 1 of {list(s)}")
    eps = a.get("epsilon", 1e-5)
    out = node.output[0]
    bn = cv.emit("BatchNorm", [x], out, s, {"batch_norm_param": {"use_global_stats": True, "eps": f32(eps)}},
                   [mean, var, np.ones(1, np.float32)], suffix="bn")
    cv.set(out, cv.emit("Scale", [bn], out, s, {"scale_param": {"axis": 1, "bias_term": True}},
                            [gamma, beta]))


def op_instance_normalization(cv: Converter, node: Any) -> None:
    """InstanceNorm decomposed exactly (see the module docstring): Caffe's MVN puts eps in the wrong place."""
    x = cv.blob(node.input[0])
    s = cv.net.shapes[x]
    if len(s) not in (3, 4):
        raise cv.refuse(f"instance normalisation of a rank-{len(s)} tensor")
    gamma = cv.const(node.input[1], "scale").astype(np.float32).reshape(-1)
    beta = cv.const(node.input[2], "bias").astype(np.float32).reshape(-1)
    eps = float(attrs(node).get("epsilon", 1e-5))
    out = node.output[0]
    n, c = s[0], s[1]
    x4 = cv.view(x, s if len(s) == 4 else (n, c, s[2], 1))
    s4 = cv.net.shapes[x4]
    # (x - mean) / sqrt(var + eps): Caffe's MVN would divide by sqrt(var) + eps instead, so only its
    # mean subtraction is used and the variance is computed explicitly.
    cen = cv.emit("MVN", [x4], out, s4, {"mvn_param": {"normalize_variance": False}}, suffix="center")
    sq = cv.emit("Eltwise", [cen, cen], out, s4, {"eltwise_param": {"operation": "PROD"}}, suffix="square")
    var = cv.emit("Pooling", [sq], out, (n, c, 1, 1), {"pooling_param": {"pool": "AVE",
                                                                         "global_pooling": True}},
                  suffix="variance")
    inv = cv.power(var, out, power=-0.5, shift=eps, suffix="rstd")
    inv2 = cv.view(inv, (n, c))
    nrm = cv.emit("Scale", [cen, inv2], out, s4, {"scale_param": {"axis": 0}}, suffix="normalize")
    y = cv.emit("Scale", [nrm], out, s4, {"scale_param": {"axis": 1, "bias_term": True}}, [gamma, beta],
                suffix="" if len(s) == 4 else "affine")
    cv.set(out, cv.view(y, s))


HANDLERS: dict[str, Handler] = {
    "BatchNormalization": op_batch_normalization, "InstanceNormalization": op_instance_normalization,
}
