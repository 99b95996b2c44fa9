"""The fast-reid source (``source.format: fastreid``): a fast-reid training config and checkpoint, built with
reidbuild's own fast-reid architectures (``reidbuild.fastreid``: hardened config reader, no fast-reid import).

With ``source.model_code`` the same section opts in to the user's own fast-reid code instead
(``fastreid_code.FastReidCodeSource``): same config file, same checkpoint format, other code building the
network. That is a variant of this format, not a format of its own, because the manifest and the files are the
same; only who builds the network differs.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from pydantic import Field

from ..manifest import LoadedManifest, RandomSource, SourceSpec
from .base import ModelSource

if TYPE_CHECKING:
    from torch import nn

# the keys that decide the deployed network; solver, datasets, losses and the classifier do not
TRAINING_ONLY_HEAD_KEYS = ("CLS_LAYER", "MARGIN", "SCALE", "NUM_CLASSES")


class FastReidSpec(SourceSpec):
    """The manifest's ``source`` section for fast-reid models."""

    format: Literal["fastreid"] = Field(description="Training framework of the checkpoint.")
    config: str = Field(description="fast-reid config.yml (relative to the manifest); _BASE_ honoured.")
    weights: Union[str, RandomSource] = Field(description="model_final.pth, or {random: {seed: N}}.")
    opts: dict[str, Union[str, int, float, bool, list[Union[str, int, float, bool]]]] = Field(
        default_factory=dict, description="Config overrides like fast-reid's --opts, dotted keys."
    )
    model_code: Optional[str] = Field(
        None, min_length=1,
        description="Opt in to building the model with your own fast-reid code instead of reidbuild's built-in "
        "architectures: the folder holding your fork's fastreid package (relative to the manifest), or "
        "'installed' for this Python's fastreid package. Runs that code; its .py files are hashed into the lock.",
    )


class FastReidSource(ModelSource):
    """A fast-reid config + checkpoint built with reidbuild's built-in architectures.

    The config is read (and checked against what the built-in architectures support) when the source is
    opened; ``config`` is that resolved config as plain data.
    """

    format = "fastreid"
    spec = FastReidSpec
    description = "build the fast-reid model from config + checkpoint"

    def __init__(self, lm: LoadedManifest) -> None:
        super().__init__(lm)
        self.fastreid = self.section(FastReidSpec)
        self.config_path = lm.resolve(self.fastreid.config)
        self.config: dict[str, Any] = self.read_config()

    @classmethod
    def open(cls, lm: LoadedManifest) -> ModelSource:
        """The built-in architectures, or the user's fast-reid code when the manifest opts in."""
        section = lm.model.source
        if isinstance(section, FastReidSpec) and section.model_code is not None:
            from .fastreid_code import FastReidCodeSource

            return FastReidCodeSource(lm)
        return cls(lm)

    def read_config(self) -> dict[str, Any]:
        """The config as reidbuild's hardened reader resolves it (_BASE_, then the manifest's opts)."""
        from ..fastreid.config import load_config

        return load_config(self.config_path, dict(self.fastreid.opts))

    def network_params(self) -> dict[str, Any]:
        """The config keys the built-in architectures read to build the inference graph."""
        model = self.config["MODEL"]
        heads = {k: v for k, v in model["HEADS"].items() if k not in TRAINING_ONLY_HEAD_KEYS}
        return {"META_ARCHITECTURE": model["META_ARCHITECTURE"], "BACKBONE": model["BACKBONE"], "HEADS": heads,
                "PIXEL_MEAN": model["PIXEL_MEAN"], "PIXEL_STD": model["PIXEL_STD"]}

    def params(self) -> dict[str, Any]:
        weights = self.fastreid.weights
        # a checkpoint's sha256 is in the inputs; seeded weights are described by their seed
        seeded = {"random": {"seed": weights.random.seed}} if isinstance(weights, RandomSource) else None
        return {"model": self.network_params(), "weights": seeded or "checkpoint"}

    def inputs(self) -> dict[str, Path]:
        inputs = {"config": self.config_path}
        if not isinstance(self.fastreid.weights, RandomSource):
            inputs["weights"] = self.lm.resolve(self.fastreid.weights)
        return inputs

    def check_input(self, height: int, width: int) -> None:
        from ..fastreid.config import check_input_size

        check_input_size(self.config, height, width, str(self.config_path))

    def checkpoint(self) -> str:
        return str(self.fastreid.weights)

    def build_network(self) -> "nn.Module":
        """The untrained eval-mode network on the CPU (weights come afterwards from the checkpoint)."""
        from ..fastreid.registry import build_model

        return build_model(self.config)

    def build_model(self) -> "nn.Module":
        """The network with the checkpoint's weights (strictly loaded), or seeded trained-like weights."""
        from ..fastreid.checkpoint import init_random, load_weights

        model = self.build_network()
        weights = self.fastreid.weights
        if isinstance(weights, RandomSource):
            init_random(model, weights.random.seed)
        else:
            load_weights(model, self.lm.resolve(weights))
        return model.eval()
