"""Stage builders: each module turns its part of the manifest into ``pipeline.Stage`` values."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from ..manifest import Input
    from ..pipeline import Stage, StageContext
    from ..probe import Probe


@dataclass(frozen=True)
class ArtifactRef:
    """An artifact file in the output folder and the stage that produces it."""

    stage: str
    file: str


def output_ref(stage: "Stage", index: int = 0) -> ArtifactRef:
    """A reference to ``stage``'s ``index``-th declared output (each builder documents the order of its outputs)."""
    return ArtifactRef(stage.name, stage.outputs[index])


def probe_for(ctx: "StageContext", inp: "Input", paths: Optional[Sequence[Path]]) -> "Probe":
    """The self-check images of this run (the first parity images, or person-like ones), loaded once."""
    from ..probe import probe_images

    probe: Probe = ctx.cached("self_check_probe", lambda: probe_images(inp.height, inp.width, inp.color,
                                                                       inp.interpolation, paths))
    return probe
