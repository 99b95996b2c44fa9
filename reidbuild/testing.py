"""Trained-like weights for tests and benchmarks.

Seeded random weights with default BatchNorm statistics give tiny features that are nearly the same for every
image, so a parity check run on them cannot tell a right export from a wrong one. A trained network differs in
two ways that matter for deployment checks: its BatchNorm running statistics describe real activations (so
every layer's output has a sensible scale), and its features separate images. ``make_trained_like`` gives a
model both properties without training: seeded weights, then the BatchNorm statistics measured on images.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np

from .probe import person_like_images  # one generator: the self-checks' probe

if TYPE_CHECKING:
    import torch

__all__ = ["feature_cosines", "make_trained_like", "measure_bn_statistics", "person_like_images"]


def _seeded_init(model: torch.nn.Module, seed: int) -> None:
    """He-normal convolutions/linears and varied BatchNorm affines, all from one seed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            weight = getattr(mod, "weight", None)
            if not isinstance(weight, torch.nn.Parameter):
                continue
            bias = getattr(mod, "bias", None)
            if isinstance(mod, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)):
                weight.copy_(torch.rand(weight.shape, generator=gen) * 0.8 + 0.6)
                if isinstance(bias, torch.Tensor) and bias.requires_grad:
                    bias.copy_(torch.randn(bias.shape, generator=gen) * 0.3 - 0.2)  # some channels off, as after training
                continue
            if weight.dim() < 2 or weight.numel() == 0:
                continue
            fan_in = weight[0].numel()
            weight.copy_(torch.randn(weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.01)
        _damp_non_local(model, gen)


def _damp_non_local(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Small output norms in Non-local blocks (modules with g/theta/phi/W children, fast-reid's and ours).

    A Non-local block's attention is cubic in its input, so with full-scale weights an image a little brighter
    than those the statistics were measured on grows through R101's nine blocks into inf. fast-reid starts
    the norm ending ``W`` at zero and training keeps these branches small; so do trained-like weights (a few
    percent of the features: dropping the block still changes them far beyond float noise).
    """
    import torch

    for mod in model.modules():
        if not all(hasattr(mod, name) for name in ("g", "theta", "phi", "W")):
            continue
        branch = mod.W
        norms = [m for m in branch.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)] \
            if isinstance(branch, torch.nn.Module) else []
        if norms and isinstance(norms[-1].weight, torch.Tensor):
            norms[-1].weight.copy_(torch.rand(norms[-1].weight.shape, generator=gen) * 0.02 + 0.01)


def _residual_closing_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BatchNorm that ends each residual branch (``bn3`` of a bottleneck, ``bn2`` of a basic block)."""
    out = []
    for block in model.modules():
        names = dict(block.named_children())
        last = "bn3" if "conv3" in names else "bn2" if "conv2" in names and "conv1" in names else None
        if last in names and "weight" in dict(names[last].named_parameters()):
            out.append(names[last])
    return out


def _calm_residual_branches(model: torch.nn.Module, seed: int) -> None:
    """Give each residual branch's last BatchNorm a small scale (0.1-0.3), as trained ResNets have (many
    recipes start it at zero). With every BatchNorm scale near 1 the residual stream of a deep ResNet grows
    block by block and the network turns chaotic: half a grey level of input noise moved an R50's features to
    cosine 0.84, which no trained re-id model does, and every reduced-precision check failed on it for that
    reason alone. With small branch scales the same noise leaves cosine > 0.999 while images keep distinct
    features."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in _residual_closing_norms(model):
            weight = bn.weight
            if isinstance(weight, torch.Tensor):  # always: only norms with a weight parameter are listed
                weight.copy_(torch.rand(weight.shape, generator=gen) * 0.2 + 0.1)


def measure_bn_statistics(model: torch.nn.Module, images: np.ndarray, batch: int = 16) -> None:
    """Replace every BatchNorm's running mean/var by the exact average over ``images`` (float32 NCHW 0..255).

    A momentum of 1/(k+1) for the k-th batch keeps the running values the cumulative average of the batches
    (what ``momentum=None`` does, but fast-reid's GhostBatchNorm passes its momentum on and needs a number),
    so the result does not depend on the batch order beyond float rounding. Each layer is measured on inputs
    normalised by the layers before it, as in training; the model is left in eval mode.
    """
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
    model.eval()  # only the BatchNorms measure: fast-reid's heads want labels in train mode
    for m in bns:
        m.train()
    with torch.no_grad():
        for k, start in enumerate(range(0, len(images), batch)):
            chunk = images[start:start + batch]
            if len(chunk) < 2:  # BatchNorm in train mode needs two samples
                chunk = images[-2:]
            for m in bns:
                m.momentum = 1.0 / (k + 1)
            model(torch.from_numpy(np.array(chunk, dtype=np.float32)))  # a copy: fast-reid normalises in place
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def make_trained_like(model: torch.nn.Module, images: np.ndarray, seed: int = 0) -> torch.nn.Module:
    """Seeded weights (small residual-branch scales, as after training) plus BatchNorm statistics measured on
    ``images``; returns ``model`` in eval mode."""
    _seeded_init(model, seed)
    _calm_residual_branches(model, seed)
    measure_bn_statistics(model, images)
    return model


def feature_cosines(features: Iterable[np.ndarray]) -> np.ndarray:
    """Pairwise cosine similarity of row features: tests use it to prove that images get distinct features."""
    feats = np.asarray(list(features), dtype=np.float64)
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    cos: np.ndarray = feats @ feats.T
    return cos
