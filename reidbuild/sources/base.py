"""What a model source is: the manifest's ``source`` section for one format, and the code that reads it,
fingerprints it and builds the reference PyTorch model.

A source format is one module in this package: a ``SourceSpec`` subclass (the manifest section, its
``format`` a one-value Literal) and a ``ModelSource`` subclass registered in ``reidbuild.sources``. The load
stage, the ONNX export, the parity reference and ``infer --backend torch`` receive the opened source and ask it
for the model; none of them reads a training framework's config or checkpoint itself.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..errors import ManifestError
from ..manifest import LoadedManifest, SourceSpec

if TYPE_CHECKING:
    from torch import nn

S = TypeVar("S", bound=SourceSpec)


class ModelSource(ABC):
    """Where the reference PyTorch model comes from, for one manifest.

    Opened at plan time (``open``): reading and validating the source's own files happens then, so their
    errors surface before any work. ``params`` and ``inputs`` make the load stage's fingerprint (with the input
    size), so anything that changes the built network must show in one of them. ``build_model`` runs only when
    a stage needs the model (import torch and the framework there, never at module level: a no-op apply must
    not load them).
    """

    format: ClassVar[str]  # the manifest's source.format that selects this source
    spec: ClassVar[type[SourceSpec]]  # the pydantic model of the manifest's source section
    description: ClassVar[str] = "build the PyTorch model"  # the load stage's line in `plan`
    tools: ClassVar[tuple[str, ...]] = ("torch",)  # distributions whose versions join the load fingerprint

    def __init__(self, lm: LoadedManifest) -> None:
        self.lm = lm

    @classmethod
    def open(cls, lm: LoadedManifest) -> "ModelSource":
        """The source for ``lm``; a format may choose among variants here (fast-reid: built-in or the user's
        code)."""
        return cls(lm)

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The load stage's fingerprint parameters besides the input size (JSON-able): by convention
        ``model`` (what shapes the inference network) and ``weights`` (``"checkpoint"`` when the checkpoint is
        the ``weights`` input, else how the weights are made)."""

    @abstractmethod
    def inputs(self) -> dict[str, Path]:
        """Files whose sha256 joins the fingerprint, by role; a checkpoint is named ``weights`` (the load
        summary and the report show its sha256)."""

    @abstractmethod
    def build_model(self) -> "nn.Module":
        """The eval-mode model on the CPU with its weights: RGB 0..255 [N,3,H,W] float32 -> features [N,D]."""

    @abstractmethod
    def checkpoint(self) -> str:
        """The weights as the manifest gives them, for messages that blame them."""

    def check_input(self, height: int, width: int) -> None:
        """Refuse, at plan time, an input size the model cannot take (ManifestError/ConfigError); any by
        default."""
        return None

    def facts(self) -> dict[str, Any]:
        """What the load stage's lock record keeps beside the fingerprint (not part of it)."""
        return {}

    def section(self, kind: type[S]) -> S:
        """The manifest's source section as this source's own spec type."""
        section = self.lm.model.source
        if not isinstance(section, kind):  # the registry chose this source by format: a programming error
            raise ManifestError(f"{self.lm.where('source')}: source: expected a {kind.__name__} section, "
                                f"got {type(section).__name__}")
        return section
