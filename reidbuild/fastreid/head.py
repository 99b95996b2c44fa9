"""fast-reid's ``EmbeddingHead`` at inference: pool, optional 1x1 embedding, optional BN neck.

fast-reid's head returns the output of ``bottleneck`` (sliced at spatial position 0,0)
when not training, whatever NECK_FEAT says; NECK_FEAT only picks the triplet-loss
feature during training.  The classifier (``weight`` and ``cls_layer``) is training-only
and deliberately absent, so a checkpoint's classifier keys are skipped by name.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import make_norm, make_pool


class EmbeddingHead(nn.Module):
    """Pooling + ``bottleneck`` Sequential ([Conv2d 1x1, bias-free] if EMBEDDING_DIM > 0, then [BN] if WITH_BNNECK)."""

    def __init__(self, feat_dim: int, embedding_dim: int, pool_layer: str, with_bnneck: bool, norm: str) -> None:
        super().__init__()
        self.pool_layer = make_pool(pool_layer)
        neck: list[nn.Module] = []
        if embedding_dim > 0:
            neck.append(nn.Conv2d(feat_dim, embedding_dim, kernel_size=1, stride=1, bias=False))
            feat_dim = embedding_dim
        if with_bnneck:
            neck.append(make_norm(norm, feat_dim))
        self.bottleneck = nn.Sequential(*neck)
        self.out_dim = feat_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        neck = self.bottleneck(self.pool_layer(features))
        return neck[:, :, 0, 0]


def build(cfg: dict[str, Any]) -> EmbeddingHead:
    """One EmbeddingHead as MODEL.HEADS describes it, fed by MODEL.BACKBONE.FEAT_DIM channels."""
    hd = cfg["MODEL"]["HEADS"]
    return EmbeddingHead(feat_dim=cfg["MODEL"]["BACKBONE"]["FEAT_DIM"], embedding_dim=hd["EMBEDDING_DIM"],
                         pool_layer=hd["POOL_LAYER"], with_bnneck=hd["WITH_BNNECK"], norm=hd["NORM"])
