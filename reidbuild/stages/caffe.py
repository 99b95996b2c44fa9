"""Caffe stage: convert the simplified ONNX into ``<name>.prototxt`` + ``<name>.caffemodel``.

Conversion needs no Caffe installation (reidbuild owns the Caffe schema); running the result is the parity
stage's business, through ``reidbuild.backends.caffe``.
"""
from __future__ import annotations

from ..caffe import CONVERTER_VERSION
from ..errors import StageFailed
from ..pipeline import Stage, StageContext, StageResult
from ..targets.caffe import CaffeTarget
from . import ArtifactRef


def caffe_stage(target: CaffeTarget, input_hw: tuple[int, int], source: ArtifactRef,
                name: str) -> Stage:
    """The ``caffe.convert`` stage reading ``source`` (simplified ONNX); outputs: prototxt, caffemodel."""
    h, w = int(input_hw[0]), int(input_hw[1])
    proto_file, model_file = f"{name}.prototxt", f"{name}.caffemodel"
    shape = (target.batch_size, 3, h, w)

    def run(ctx: StageContext) -> StageResult:
        from ..caffe.convert import convert_file

        path = ctx.artifact(source.file)
        ctx.log(f"converting {source.file} to Caffe ({target.dialect} dialect, input {list(shape)})")
        try:
            # parsed from the file and dropped once converted: no bytes copy held next to the model
            conv = convert_file(path, target.dialect, shape, name=name)
        except FileNotFoundError:
            raise StageFailed(f"{source.file}: the ONNX artifact is missing (stage {source.stage})") from None
        record = {"dialect": target.dialect, "converter": CONVERTER_VERSION, "layers": conv.layer_count,
                  "layer_types": conv.layer_types, "input_shape": list(conv.input_shape),
                  "output_shape": list(conv.output_shape)}
        return StageResult({proto_file: conv.prototxt.encode("utf-8"), model_file: conv.caffemodel}, record)

    stage = Stage("caffe.convert", run,
                  params={"dialect": target.dialect, "batch_size": target.batch_size, "input": [h, w],
                          "converter": CONVERTER_VERSION},
                  deps=(source.stage,), outputs=(proto_file, model_file), tools=("onnx", "protobuf"),
                  description=f"convert the ONNX model to Caffe ({target.dialect} dialect)")
    return stage
