"""The Caffe target: ``caffe.convert`` (from the ``onnx.graph`` role) -> [``caffe.patch``], run by pycaffe or
OpenCV's Caffe importer (``reidbuild.backends.caffe``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Optional

from pydantic import Field

from ..manifest_parts import Strict
from .base import BackendBuild, Build, Target, patch_files

if TYPE_CHECKING:
    from ..backends.base import Runner
    from ..stages import ArtifactRef


class CaffeTarget(Strict):
    dialect: Literal["bvlc", "ceil_mode"] = Field(
        description="bvlc: stock Caffe 1.0 (ceil pooling, no rounding field); "
        "ceil_mode: the fork field PoolingParameter.ceil_mode = 13 (bool). Never guessed."
    )
    patches: list[str] = Field(default_factory=list)
    batch_size: int = Field(1, ge=1, le=1024, description="N of the prototxt's input shape.")


def caffe_runner(proto: ArtifactRef, model: ArtifactRef) -> Callable[[Callable[[str], Path]], Runner]:
    """The runner factory for a prototxt + caffemodel pair (pycaffe when built, else OpenCV)."""
    def make(resolve: Callable[[str], Path]) -> Runner:
        from ..backends import caffe as caffe_backend  # numpy and friends: only when a stage runs

        return caffe_backend.CaffeRunner(resolve(proto.file), resolve(model.file), runtime="auto")
    return make


def caffe_available() -> Optional[str]:
    """Why no Caffe runtime can run here, or None."""
    from ..backends import caffe as caffe_backend

    return caffe_backend.available("auto")


def contribute(build: Build, target: CaffeTarget) -> None:
    """Convert the simplified ONNX (before ONNX-only patches), then apply the Caffe patches."""
    from ..stages import output_ref
    from ..stages.caffe import caffe_stage
    from ..stages.patch import patch_stage

    m = build.lm.model
    h, w = m.input.height, m.input.width
    st = build.add(caffe_stage(target, (h, w), build.artifact("onnx.graph").ref, m.name))
    proto, model = output_ref(st, 0), output_ref(st, 1)
    transforms: list[str] = []
    caffe_patches = patch_files(build.lm, target.patches, "caffe")
    if caffe_patches:
        from ..patches import output_transforms  # the patch language's models: only when there are patches

        out = [f"{m.name}.patched.prototxt", f"{m.name}.patched.caffemodel"]
        st = build.add(patch_stage("caffe", caffe_patches, [proto, model], out, m.name, dialect=target.dialect,
                                   check_input_shape=(target.batch_size, 3, h, w)))
        proto, model = output_ref(st, 0), output_ref(st, 1)
        transforms = output_transforms(caffe_patches)
    build.runner("caffe", BackendBuild([proto, model], caffe_runner(proto, model), available=caffe_available,
                                       output_transforms=transforms))


TARGET = Target("caffe", CaffeTarget, contribute, backends={"caffe": "fp32"}, requestable=("caffe",),
                description="a Caffe prototxt + caffemodel (pycaffe or OpenCV)")
