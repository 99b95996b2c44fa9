"""fast-reid's own model for a config reidbuild resolved: the reference the architecture tests compare with.

The installed ``fastreid`` package (1.4.0, fast-reid's real code) builds the model with its ``build_model``
from a yacs config filled from reidbuild's resolved dict, on the CPU and without pretrained weights.
Weights are made trained-like on fast-reid's model (seeded, BN statistics measured on person-like images)
and saved the way fast-reid's Checkpointer does, so reidbuild loads them as it would a real model_final.pth.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from reidbuild.testing import make_trained_like, person_like_images


def fastreid_cfg(cfg: dict[str, Any]) -> Any:
    """fast-reid's CfgNode with the MODEL and INPUT values of reidbuild's resolved config."""
    from fastreid.config import get_cfg

    node = get_cfg()
    for section in ("MODEL", "INPUT"):
        _fill(node[section], cfg[section])
    node.MODEL.DEVICE = "cpu"
    node.MODEL.BACKBONE.PRETRAIN = False
    node.MODEL.HEADS.NUM_CLASSES = node.MODEL.HEADS.NUM_CLASSES or 11
    return node


def _fill(node: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if key not in node:
            continue
        if isinstance(value, dict):
            _fill(node[key], value)
        else:
            node[key] = type(node[key])(value) if isinstance(node[key], (tuple, list)) else value


def fastreid_model(cfg: dict[str, Any], height: int, width: int, seed: int = 0) -> torch.nn.Module:
    """fast-reid's eval-mode model with trained-like weights measured on person-like images."""
    from fastreid.modeling import build_model

    torch.manual_seed(seed)
    model = build_model(fastreid_cfg(cfg))
    # fast-reid normalises its input in place: hand it a copy each time
    images = person_like_images(8, height, width, seed=seed)
    make_trained_like(_CopyingInput(model), images.copy(), seed=seed)
    return model.eval()


class _CopyingInput(torch.nn.Module):
    """Calls fast-reid's model on a copy (its preprocess_image subtracts the mean in place)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Any:
        return self.model(images.clone())


def save_like_fastreid(model: torch.nn.Module, path: Path) -> Path:
    """What fast-reid's Checkpointer writes: {"model": state_dict, ...} (classifier weights included)."""
    torch.save({"model": model.state_dict(), "iteration": 100}, path)
    return path


def eval_features(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(images.copy())).numpy()


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}

