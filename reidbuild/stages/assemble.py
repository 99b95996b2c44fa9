"""Turn a validated manifest into the ordered list of stages (the plan's skeleton).

load -> onnx.export -> onnx.simplify -> onnx.patch -> [caffe.convert -> caffe.patch]
     -> [precision.fp16|int8 -> parity.onnx_<mode>] -> [tensorrt.engine] -> parity.<backend>...
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..manifest import LoadedManifest
from ..pipeline import Stage, StageContext
from . import ArtifactRef
from .load import load_stage
from .onnx import export_stage, simplify_stage
from .parity import ParityCheck, fp32_profile, parity_stage


def _patch_files(lm: LoadedManifest, rels: list[str], key: str) -> list[Path]:
    from ..errors import ManifestError

    paths = []
    for i, rel in enumerate(rels):
        p = lm.resolve(rel)
        if not p.is_file():
            raise ManifestError(f"{lm.where('targets', key, 'patches', i)}: targets.{key}.patches[{i}]: "
                                f"patch file {rel!r} not found")
        paths.append(p)
    return paths


def assemble(lm: LoadedManifest) -> list[Stage]:
    m = lm.model
    name = m.name
    h, w = m.input.height, m.input.width
    stages: list[Stage] = []
    checks: list[ParityCheck] = []

    load, load_ref, cfg = load_stage(lm)
    stages.append(load)

    # ONNX chain: the last ONNX stage writes <name>.onnx
    onnx_t = m.targets.onnx
    onnx_patches = _patch_files(lm, onnx_t.patches, "onnx")
    chain = ["export"] + (["simplify"] if onnx_t.simplify else []) + (["patch"] if onnx_patches else [])
    files = {"export": f"{name}.export.onnx", "simplify": f"{name}.sim.onnx", "patch": f"{name}.onnx"}
    files[chain[-1]] = f"{name}.onnx"
    st, ref = export_stage(lm, cfg, load_ref, files["export"])
    stages.append(st)
    if onnx_t.simplify:
        st, ref = simplify_stage(lm, ref, files["simplify"])
        stages.append(st)
    graph_ref = ref  # the single source for Caffe: simplified, before ONNX-only patches
    onnx_transforms: list[str] = []
    if onnx_patches:
        from ..patches import output_transforms
        from .patch import patch_stage

        st = patch_stage("onnx", onnx_patches, [ref], [files["patch"]], name, dialect=None,
                         check_input_shape=(1, 3, h, w))
        stages.append(st)
        ref = ArtifactRef(st.name, files["patch"])
        onnx_transforms = output_transforms(onnx_patches)
    final_onnx = ref

    parity = m.parity
    wanted = set(parity.backends) if parity else set()

    def ort_runner(art: ArtifactRef):
        def make(ctx: StageContext):
            from ..backends.onnxruntime import OnnxRuntimeRunner

            return OnnxRuntimeRunner(ctx.artifact(art.file))
        return make

    if "onnxruntime" in wanted:
        checks.append(ParityCheck("onnxruntime", [final_onnx], ort_runner(final_onnx), fp32_profile(lm),
                                  output_transforms=onnx_transforms))

    if m.targets.caffe is not None:
        from .caffe import caffe_stage

        ct = m.targets.caffe
        st, proto_ref, model_ref = caffe_stage(ct, (h, w), graph_ref, name)
        stages.append(st)
        caffe_transforms: list[str] = []
        caffe_patches = _patch_files(lm, ct.patches, "caffe")
        if caffe_patches:
            from ..patches import output_transforms
            from .patch import patch_stage

            out = [f"{name}.patched.prototxt", f"{name}.patched.caffemodel"]
            st = patch_stage("caffe", caffe_patches, [proto_ref, model_ref], out, name, dialect=ct.dialect,
                             check_input_shape=(ct.batch_size, 3, h, w))
            stages.append(st)
            proto_ref, model_ref = ArtifactRef(st.name, out[0]), ArtifactRef(st.name, out[1])
            caffe_transforms = output_transforms(caffe_patches)
        if "caffe" in wanted:
            from ..backends import caffe as caffe_backend

            def caffe_runner(ctx: StageContext, p=proto_ref, c=model_ref):
                return caffe_backend.CaffeRunner(ctx.artifact(p.file), ctx.artifact(c.file), runtime="auto")

            checks.append(ParityCheck("caffe", [proto_ref, model_ref], caffe_runner, fp32_profile(lm),
                                      available=lambda: caffe_backend.available("auto"),
                                      output_transforms=caffe_transforms))

    images: Optional[list[Path]] = lm.images("parity", "images") if parity else None
    precision_checks: list[ParityCheck] = []
    if m.targets.tensorrt is not None:
        from ..precision.profiles import default_tolerance
        from .precision import precision_stage
        from .tensorrt import engine_stage

        tt = m.targets.tensorrt
        calib = lm.images("targets", "tensorrt", "calibration", "images") if tt.calibration else []
        made = precision_stage(tt, final_onnx, name, calib, m.input)
        engine_src = final_onnx
        if made is not None:
            st, engine_src = made
            stages.append(st)
            check = f"onnx_{tt.mode}"
            precision_checks.append(ParityCheck(check, [engine_src], ort_runner(engine_src),
                                                default_tolerance(check), output_transforms=onnx_transforms))
        engine = engine_stage(tt, engine_src, name)
        if "tensorrt" in wanted:
            from ..backends import tensorrt as trt_backend

            engine_file = engine.outputs[0]

            def trt_runner(ctx: StageContext, f=engine_file):
                return trt_backend.TensorRTRunner(ctx.artifact(f))

            profile = fp32_profile(lm) if tt.mode == "fp32" else default_tolerance(f"onnx_{tt.mode}")
            checks.append(ParityCheck("tensorrt", [ArtifactRef(engine.name, engine_file)], trt_runner, profile,
                                      available=trt_backend.available, output_transforms=onnx_transforms))
        # precision ONNX is proven on the CPU before any engine is built
        if parity and images is not None:
            stages.extend(parity_stage(lm, cfg, load_ref, c, images) for c in precision_checks)
        stages.append(engine)

    if parity and images is not None:
        stages.extend(parity_stage(lm, cfg, load_ref, c, images) for c in checks)
    return stages
