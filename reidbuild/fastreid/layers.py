"""Inference-only building blocks whose attribute names mirror fast-reid's layers.

Attribute names here are part of a contract: they become ``state_dict`` keys, and a
checkpoint written by fast-reid only loads if every name and shape lines up.  The
forward passes are written for export: no data-dependent Python control flow and no
in-place tricks, so ``torch.onnx.export(..., dynamo=False)`` traces a static graph.
"""
from __future__ import annotations

import torch
from torch import nn

from .catalog import BN_NORMS, LEGACY_POOL_NAMES, POOL_NAMES

# fast-reid's norm names that all reduce to a plain BatchNorm2d at inference.
# BN and syncBN differ only in how training statistics are gathered; GhostBN (with
# fast-reid >= v0.3's single split) evaluates with the running statistics like BN and
# keeps the same buffer names.


def make_norm(norm: str, channels: int) -> nn.BatchNorm2d:
    """A norm layer for one of :data:`BN_NORMS`; keys: weight, bias, running_mean, running_var, num_batches_tracked."""
    if norm not in BN_NORMS:  # config validation normally catches this first
        raise ValueError(f"unsupported norm {norm!r}")
    return nn.BatchNorm2d(channels, eps=1e-5)


class IBN(nn.Module):
    """IBN-a normalisation: InstanceNorm on the first half of the channels, BN on the rest.

    fast-reid names the halves ``IN`` and ``BN``; the IN half is ``int(planes / 2)`` wide and
    affine (so it has weight/bias but no running statistics).
    """

    def __init__(self, planes: int, norm: str) -> None:
        super().__init__()
        self.split = int(planes / 2)  # not ``half``: that would hide nn.Module.half()
        self.IN = nn.InstanceNorm2d(self.split, affine=True)
        self.BN = make_norm(norm, planes - self.split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.IN(x[:, : self.split].contiguous())  # contiguous like fast-reid: same float rounding
        second = self.BN(x[:, self.split :].contiguous())
        return torch.cat((first, second), dim=1)


class SELayer(nn.Module):
    """Squeeze-and-excitation gate; ``fc.0``/``fc.2`` are bias-free Linears as in fast-reid."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = int(channels / reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(self.avg_pool(x).flatten(1))
        return x * gate.unsqueeze(-1).unsqueeze(-1)


class NonLocal(nn.Module):
    """fast-reid's ``Non_local`` block (dot-product attention, residual through ``W``).

    fast-reid computes its inner width as ``reduc_ratio // reduc_ratio``, i.e. always 1;
    we keep that so the checkpoint shapes ([1, C, 1, 1] for g/theta/phi) match.
    """

    inter_channels = 1

    def __init__(self, in_channels: int, norm: str) -> None:
        super().__init__()
        self.in_channels = in_channels
        inter = self.inter_channels
        self.g = nn.Conv2d(in_channels, inter, kernel_size=1)
        self.W = nn.Sequential(nn.Conv2d(inter, in_channels, kernel_size=1), make_norm(norm, in_channels))
        self.theta = nn.Conv2d(in_channels, inter, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inter, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g_x = self.g(x).flatten(2).transpose(1, 2)  # [N, HW, 1]
        theta_x = self.theta(x).flatten(2).transpose(1, 2)  # [N, HW, 1]
        phi_x = self.phi(x).flatten(2)  # [N, 1, HW]
        affinity = torch.matmul(theta_x, phi_x)  # [N, HW, HW]
        affinity = affinity / affinity.shape[-1]
        y = torch.matmul(affinity, g_x)  # [N, HW, 1]
        y = y.transpose(1, 2).reshape(x.shape[0], self.inter_channels, x.shape[2], x.shape[3])
        return self.W(y) + x


# --------------------------------------------------------------------------- pooling
# Every pooling layer returns [N, C, 1, 1] (Identity returns the map itself), as the
# head in fast-reid slices ``[..., 0, 0]`` after its bottleneck.


class Identity(nn.Module):
    """No pooling: fast-reid's head then keeps only the top-left position of the map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class GlobalAvgPool(nn.AdaptiveAvgPool2d):
    """Adaptive average pooling to 1x1 (exports as GlobalAveragePool)."""

    def __init__(self) -> None:
        super().__init__(1)


class GlobalMaxPool(nn.AdaptiveMaxPool2d):
    """Adaptive max pooling to 1x1 (exports as GlobalMaxPool)."""

    def __init__(self) -> None:
        super().__init__(1)


class FastGlobalAvgPool(nn.Module):
    """Mean over H and W; fast-reid's reshape-and-mean variant of global average pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class GeneralizedMeanPooling(nn.Module):
    """GeM with a fixed exponent (fast-reid default p=3, eps=1e-6); p is not a weight."""

    def __init__(self, norm: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = float(norm)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1)
        return pooled.pow(1.0 / self.p)


class GeneralizedMeanPoolingP(nn.Module):
    """GeM with a learned exponent stored as the 1-element parameter ``p``."""

    def __init__(self, norm: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(norm)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1)
        return pooled.pow(1.0 / self.p)


class AdaptiveAvgMaxPool(nn.Module):
    """Sum of global average and global max pooling (submodules ``gap`` and ``gmp``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gap = FastGlobalAvgPool()
        self.gmp = GlobalMaxPool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gap(x) + self.gmp(x)


class ClipGlobalAvgPool(nn.Module):
    """Global average pooling clamped to [0, 1] (submodule ``avgpool``)."""

    def __init__(self) -> None:
        super().__init__()
        self.avgpool = FastGlobalAvgPool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.avgpool(x).clamp(min=0.0, max=1.0)


POOL_LAYERS: dict[str, type[nn.Module]] = {
    "Identity": Identity,
    "GlobalAvgPool": GlobalAvgPool,
    "GlobalMaxPool": GlobalMaxPool,
    "FastGlobalAvgPool": FastGlobalAvgPool,
    "GeneralizedMeanPooling": GeneralizedMeanPooling,
    "GeneralizedMeanPoolingP": GeneralizedMeanPoolingP,
    "AdaptiveAvgMaxPool": AdaptiveAvgMaxPool,
    "ClipGlobalAvgPool": ClipGlobalAvgPool,
}

assert tuple(POOL_LAYERS) == POOL_NAMES, "catalog.POOL_NAMES must list the classes above"


def make_pool(name: str) -> nn.Module:
    """Instantiate a pooling layer by its fast-reid name (current or legacy spelling)."""
    return POOL_LAYERS[LEGACY_POOL_NAMES.get(name, name)]()
