"""Stage builders: each module turns its part of the manifest into ``pipeline.Stage`` values."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArtifactRef:
    """An artifact file in the output folder and the stage that produces it."""

    stage: str
    file: str
