"""Build any registered fast-reid architecture: the dispatch behind ``build_model``.

Which names exist is plain data in :mod:`.catalog` (``BACKBONES``, ``META_ARCHITECTURES``); each names a
module of this package with a ``build`` function. Adding an architecture means adding its module and one
catalog entry, nothing here.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from torch import nn

from .catalog import BACKBONES, META_ARCHITECTURES
from .config import check_supported


def build_backbone(cfg: dict[str, Any]) -> nn.Module:
    """The backbone MODEL.BACKBONE.NAME names, untrained (the config must be validated)."""
    spec = BACKBONES[cfg["MODEL"]["BACKBONE"]["NAME"]]
    return import_module(f".{spec.module}", __package__).build(cfg)


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """Build the eval-mode model a config describes, on the CPU, with untrained weights.

    Weights come afterwards from :func:`reidbuild.fastreid.checkpoint.load_weights` (or
    :func:`~reidbuild.fastreid.checkpoint.init_random`); MODEL.BACKBONE.PRETRAIN is never
    honoured because ImageNet weights would be overwritten anyway and must not be fetched.
    The model takes float32 [N, 3, H, W] RGB 0..255 and returns float32 [N, D] features.
    """
    check_supported(cfg)
    meta = import_module(f".{META_ARCHITECTURES[cfg['MODEL']['META_ARCHITECTURE']]}", __package__)
    model = meta.build(cfg, build_backbone)
    model.eval()
    model.requires_grad_(False)
    return model
