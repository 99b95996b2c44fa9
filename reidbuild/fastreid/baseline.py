"""fast-reid's ``Baseline`` meta-architecture for inference.

The model owns the input normalisation (``pixel_mean``/``pixel_std`` buffers shaped
[1, 3, 1, 1], as fast-reid registers them) so that the exported graph takes raw RGB
0..255 pixels: deployment code then cannot forget or reorder the normalisation.
Like fast-reid >= v1.1 the two buffers are not persistent: their values come from the
config, not from the checkpoint.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import head
from .head import EmbeddingHead


class Baseline(nn.Module):
    """Backbone + EmbeddingHead; float32 [N, 3, H, W] RGB in 0..255 -> float32 [N, D] features."""

    pixel_mean: torch.Tensor  # buffers registered in __init__
    pixel_std: torch.Tensor

    def __init__(self, backbone: nn.Module, heads: EmbeddingHead, pixel_mean: list[float],
                 pixel_std: list[float], num_classes: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False)
        # Only needed to write training-format checkpoints (classifier shape).
        self.num_classes = num_classes

    @property
    def feature_dim(self) -> int:
        """Length D of the feature vector the model returns."""
        return self.heads.out_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.pixel_mean) / self.pixel_std
        return self.heads(self.backbone(x))


def build(cfg: dict[str, Any], build_backbone: Callable[[dict[str, Any]], nn.Module]) -> Baseline:
    """Backbone + one EmbeddingHead, as fast-reid's Baseline.from_config assembles them."""
    model_cfg = cfg["MODEL"]
    return Baseline(build_backbone(cfg), head.build(cfg), model_cfg["PIXEL_MEAN"], model_cfg["PIXEL_STD"],
                    model_cfg["HEADS"]["NUM_CLASSES"])
