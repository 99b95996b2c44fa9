"""Turn a validated manifest into the ordered list of stages (the plan's skeleton) and the backend runners.

load -> onnx.export -> onnx.simplify -> onnx.patch -> [caffe.convert -> caffe.patch]
     -> [precision.fp16|int8 -> parity.onnx_<mode>] -> [precision.int8_cpu -> parity.onnx_int8_cpu]
     -> [tensorrt.engine] -> parity.<backend>...

The same runner factories serve parity (inside a run) and ``infer`` (on committed artifacts), so both
feed each backend exactly the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..backends.base import Runner
from ..manifest import LoadedManifest
from ..pipeline import Stage
from ..probe import PROBE_COUNT
from . import ArtifactRef
from .load import load_stage
from .onnx import export_stage, simplify_stage
from .parity import ParityCheck, fp32_profile, parity_stage

# a runner factory gets a resolver from artifact file name to path
RunnerFactory = Callable[[Callable[[str], Path]], Runner]


@dataclass
class BackendBuild:
    """How to run one built backend: the artifacts it needs and a factory for its runner."""

    artifacts: list[ArtifactRef]
    factory: RunnerFactory
    available: Optional[Callable[[], Optional[str]]] = None
    output_transforms: list[str] = field(default_factory=list)


@dataclass
class Assembly:
    stages: list[Stage]
    backends: dict[str, BackendBuild]  # onnxruntime, caffe, onnx_fp16, onnx_int8, onnx_int8_cpu, tensorrt


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


def _ort_factory(art: ArtifactRef, layout: str, color: str) -> RunnerFactory:
    def make(resolve: Callable[[str], Path]) -> Runner:
        from ..backends.onnxruntime import OnnxRuntimeRunner
        from ..patches import adapt_input

        return OnnxRuntimeRunner(resolve(art.file), adapt=lambda b: adapt_input(layout, b, color))
    return make


def _int8_cpu(lm: LoadedManifest, source: ArtifactRef, layout: str, transforms: list[str],
              probe_paths: Optional[list[Path]]) -> tuple[Stage, BackendBuild]:
    """``precision.int8_cpu`` from the final ONNX (``targets.onnx_int8_cpu``) and its onnxruntime backend."""
    from ..patches import adapt_input
    from .precision import int8_stage

    m = lm.model
    target = m.targets.onnx_int8_cpu
    assert target is not None
    calib = lm.images("targets", "onnx_int8_cpu", "calibration", "images")
    st, ref = int8_stage(target, source, m.name, calib, m.input,
                         adapt=lambda b: adapt_input(layout, b, m.input.color), probe_paths=probe_paths, cpu=True)
    return st, BackendBuild([ref], _ort_factory(ref, layout, m.input.color), output_transforms=transforms)


def assemble(lm: LoadedManifest) -> Assembly:
    m = lm.model
    name = m.name
    h, w = m.input.height, m.input.width
    stages: list[Stage] = []
    backends: dict[str, BackendBuild] = {}

    parity = m.parity
    images: Optional[list[Path]] = lm.images("parity", "images") if parity else None
    # the self-checks of load and every ONNX-writing stage run on the first parity images (person-like without)
    probe_paths = images[:PROBE_COUNT] if images else None
    load, load_ref, cfg = load_stage(lm, probe_paths)
    stages.append(load)

    # ONNX chain: the last ONNX stage writes <name>.onnx
    onnx_t = m.targets.onnx
    onnx_patches = _patch_files(lm, onnx_t.patches, "onnx")
    chain = ["export"] + (["simplify"] if onnx_t.simplify else []) + (["patch"] if onnx_patches else [])
    files = {"export": f"{name}.export.onnx", "simplify": f"{name}.sim.onnx", "patch": f"{name}.onnx"}
    files[chain[-1]] = f"{name}.onnx"
    st, ref = export_stage(lm, cfg, load_ref, files["export"], probe_paths)
    stages.append(st)
    if onnx_t.simplify:
        st, ref = simplify_stage(lm, ref, files["simplify"], probe_paths)
        stages.append(st)
    graph_ref = ref  # the single source for Caffe: simplified, before ONNX-only patches
    onnx_transforms: list[str] = []
    layout = "float32_nchw"
    if onnx_patches:
        from ..patches import input_layout, output_transforms
        from .patch import patch_stage

        st = patch_stage("onnx", onnx_patches, [ref], [files["patch"]], name, dialect=None,
                         check_input_shape=(1, 3, h, w), probe_input=m.input, probe_paths=probe_paths)
        stages.append(st)
        ref = ArtifactRef(st.name, files["patch"])
        onnx_transforms = output_transforms(onnx_patches)
        layout = input_layout(onnx_patches)
    final_onnx = ref
    backends["onnxruntime"] = BackendBuild([final_onnx], _ort_factory(final_onnx, layout, m.input.color),
                                           output_transforms=onnx_transforms)

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

        def caffe_runner(resolve: Callable[[str], Path], p=proto_ref, c=model_ref) -> Runner:
            from ..backends import caffe as caffe_backend  # numpy and friends: only when a stage runs

            return caffe_backend.CaffeRunner(resolve(p.file), resolve(c.file), runtime="auto", dialect=ct.dialect)

        def caffe_available() -> Optional[str]:
            from ..backends import caffe as caffe_backend

            return caffe_backend.available("auto")

        backends["caffe"] = BackendBuild([proto_ref, model_ref], caffe_runner, available=caffe_available,
                                         output_transforms=caffe_transforms)

    def check(name_: str, profile: dict) -> ParityCheck:
        b = backends[name_]
        return ParityCheck(name_, b.artifacts, lambda ctx, f=b.factory: f(ctx.artifact), profile,
                           available=b.available, output_transforms=b.output_transforms)

    def fp32_or_precision_profile(b: str) -> dict:
        tt = m.targets.tensorrt
        if b == "tensorrt" and tt is not None and tt.mode != "fp32":
            from ..precision.profiles import default_tolerance

            return default_tolerance(f"onnx_{tt.mode}")
        return fp32_profile(lm)

    wanted = list(parity.backends) if parity is not None and images is not None else []
    engine: Optional[Stage] = None
    if m.targets.tensorrt is not None:
        from ..backends import tensorrt as trt_backend
        from ..precision.profiles import default_tolerance
        from .precision import precision_stage
        from .tensorrt import engine_stage

        tt = m.targets.tensorrt
        calib = lm.images("targets", "tensorrt", "calibration", "images") if tt.calibration else []
        from ..patches import adapt_input

        made = precision_stage(tt, final_onnx, name, calib, m.input,
                               adapt=lambda b: adapt_input(layout, b, m.input.color), probe_paths=probe_paths)
        engine_src = final_onnx
        if made is not None:
            st, engine_src = made
            stages.append(st)
            key = f"onnx_{tt.mode}"
            backends[key] = BackendBuild([engine_src], _ort_factory(engine_src, layout, m.input.color),
                                         output_transforms=onnx_transforms)
            # the reduced-precision ONNX is proven on the CPU before any engine is built
            if images is not None:
                stages.append(parity_stage(lm, cfg, load_ref, check(key, default_tolerance(key)), images))
        engine = engine_stage(tt, engine_src, name)
        engine_ref = ArtifactRef(engine.name, next(f for f in engine.outputs if f.endswith(".engine")))

        def trt_runner(resolve: Callable[[str], Path], f=engine_ref.file) -> Runner:
            from ..patches import adapt_input

            return trt_backend.TensorRTRunner(resolve(f), adapt=lambda b: adapt_input(layout, b, m.input.color))

        backends["tensorrt"] = BackendBuild([engine_ref], trt_runner, available=trt_backend.available,
                                            output_transforms=onnx_transforms)

    if m.targets.onnx_int8_cpu is not None:
        from ..precision.profiles import default_tolerance

        st, backends["onnx_int8_cpu"] = _int8_cpu(lm, final_onnx, layout, onnx_transforms, probe_paths)
        stages.append(st)
        if images is not None:  # the manifest validator demands a parity section for this target
            stages.append(parity_stage(lm, cfg, load_ref, check("onnx_int8_cpu", default_tolerance("onnx_int8_cpu")),
                                       images))

    # every check this machine can do runs before the engine, which may be unavailable here (exit 3)
    for b in wanted:
        if b != "tensorrt":
            stages.append(parity_stage(lm, cfg, load_ref, check(b, fp32_or_precision_profile(b)), images))
    if engine is not None:
        stages.append(engine)
        if "tensorrt" in wanted:
            stages.append(parity_stage(lm, cfg, load_ref, check("tensorrt", fp32_or_precision_profile("tensorrt")),
                                       images))
        if images:
            from ..rebuild import runner_equivalence

            engine.equivalent = runner_equivalence(backends["tensorrt"].factory, images, m.input,
                                                   fp32_or_precision_profile("tensorrt"))
    checks = [s.name for s in stages if s.name.startswith("parity.")]
    if checks and images:
        from .report import report_stage

        stages.append(report_stage(lm, checks, [s.name for s in stages] + ["report"], images))
    return Assembly(stages, backends)
