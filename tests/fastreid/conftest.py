"""Shared helpers for the fast-reid tests: configs built through the real loader, small inputs."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from reidbuild.fastreid import build_model, init_random, load_config

MINIMAL_YAML = """\
MODEL:
  META_ARCHITECTURE: Baseline
  BACKBONE:
    NAME: build_resnet_backbone
  HEADS:
    NAME: EmbeddingHead
"""

FEAT_DIMS = {"18x": 512, "34x": 512, "50x": 2048, "101x": 2048}


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    # The suite must stay fast on 2 cores; oversubscription only slows it down.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def minimal_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "minimal.yml"
    path.write_text(MINIMAL_YAML)
    return path


@pytest.fixture(scope="session")
def make_cfg(minimal_yaml: Path) -> Callable[..., dict[str, Any]]:
    """``make_cfg(depth="50x", **{"MODEL.HEADS.POOL_LAYER": ...})`` -> a loaded, validated config."""

    def make(depth: str = "18x", **opts: Any) -> dict[str, Any]:
        merged: dict[str, Any] = {"MODEL.BACKBONE.DEPTH": depth, "MODEL.BACKBONE.FEAT_DIM": FEAT_DIMS[depth]}
        merged.update(opts)
        return load_config(minimal_yaml, merged)

    return make


@pytest.fixture(scope="session")
def make_model(make_cfg: Callable[..., dict[str, Any]]) -> Callable[..., torch.nn.Module]:
    """Build a model from config options and give it seeded random weights."""

    def make(depth: str = "18x", seed: int = 0, **opts: Any) -> torch.nn.Module:
        model = build_model(make_cfg(depth, **opts))
        init_random(model, seed)
        return model

    return make


@pytest.fixture(scope="session")
def make_images() -> Callable[..., torch.Tensor]:
    """Deterministic float32 RGB images in 0..255 (the model's input contract), small by default."""

    def make(n: int = 2, h: int = 64, w: int = 32, seed: int = 0) -> torch.Tensor:
        return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255.0

    return make
