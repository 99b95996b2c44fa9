"""fast-reid's ``Baseline`` meta-architecture for inference, and ``build_model``.

The model owns the input normalisation (``pixel_mean``/``pixel_std`` buffers shaped
[1, 3, 1, 1], as fast-reid registers them) so that the exported graph takes raw RGB
0..255 pixels: deployment code then cannot forget or reorder the normalisation.
Like fast-reid >= v1.1 the two buffers are not persistent: their values come from the
config, not from the checkpoint.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import check_supported
from .config import supported as _supported
from .head import EmbeddingHead
from .resnet import ResNet


class Baseline(nn.Module):
    """Backbone + EmbeddingHead; float32 [N, 3, H, W] RGB in 0..255 -> float32 [N, D] features."""

    def __init__(self, backbone: ResNet, heads: EmbeddingHead, pixel_mean: list[float],
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


def build_model(cfg: dict[str, Any]) -> Baseline:
    """Build the eval-mode model a config describes, on the CPU, with untrained weights.

    Weights come afterwards from :func:`reidbuild.fastreid.checkpoint.load_weights` (or
    :func:`~reidbuild.fastreid.checkpoint.init_random`); MODEL.BACKBONE.PRETRAIN is never
    honoured because ImageNet weights would be overwritten anyway and must not be fetched.
    """
    check_supported(cfg)
    model_cfg = cfg["MODEL"]
    bb = model_cfg["BACKBONE"]
    hd = model_cfg["HEADS"]
    backbone = ResNet(
        depth=bb["DEPTH"], last_stride=bb["LAST_STRIDE"], norm=bb["NORM"],
        with_ibn=bb["WITH_IBN"], with_se=bb["WITH_SE"], with_nl=bb["WITH_NL"],
    )
    heads = EmbeddingHead(
        feat_dim=bb["FEAT_DIM"], embedding_dim=hd["EMBEDDING_DIM"], pool_layer=hd["POOL_LAYER"],
        with_bnneck=hd["WITH_BNNECK"], norm=hd["NORM"],
    )
    model = Baseline(backbone, heads, model_cfg["PIXEL_MEAN"], model_cfg["PIXEL_STD"], hd["NUM_CLASSES"])
    model.eval()
    model.requires_grad_(False)
    return model


def supported() -> dict[str, list[str]]:
    """The config values reidbuild can build (key -> allowed values)."""
    return _supported()
