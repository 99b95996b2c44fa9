"""precision.* and tensorrt.engine stages: their declarations, and running them through the pipeline."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reidbuild import lockfile
from reidbuild.errors import ImageError, Unavailable
from reidbuild.manifest import Calibration, Input, TensorRTTarget
from reidbuild.pipeline import Planner, Stage, StageResult, run
from reidbuild.fsutil import HashCache
from reidbuild.stages import ArtifactRef, output_ref
from reidbuild.stages.precision import precision_stage
from reidbuild.stages.tensorrt import engine_stage

INPUT = Input(height=256, width=128)


def _source_stage(data: bytes) -> tuple[Stage, ArtifactRef]:
    st = Stage("onnx.simplify", lambda ctx: StageResult({"demo.onnx": data}), outputs=("demo.onnx",))
    return st, ArtifactRef(st.name, "demo.onnx")


def _run(stages, root: Path, **kw):
    events = []
    outcome = run(stages, lock_path=root / "m.lock", manifest_entry={}, output_dir=root / "out", base=root,
                  emit=events.append, **kw)
    return outcome, events


def test_fp32_needs_no_precision_stage():
    assert precision_stage(TensorRTTarget(mode="fp32", batch_size=8), ArtifactRef("onnx.simplify", "x.onnx"),
                           "x", [], INPUT) is None


def test_int8_stage_declares_calibration_images_as_inputs(tmp_path):
    paths = [tmp_path / f"c{i}.png" for i in range(10)]
    target = TensorRTTarget(mode="int8", batch_size=4,
                            calibration=Calibration(images="c*.png", batches=2, method="percentile", percentile=99.9))
    stage = precision_stage(target, ArtifactRef("onnx.simplify", "demo.onnx"), "demo", paths, INPUT)
    ref = output_ref(stage)
    assert stage.name == "precision.int8" and ref == ArtifactRef("precision.int8", "demo.int8.onnx")
    assert stage.outputs == ("demo.int8.onnx",) and stage.deps == ("onnx.simplify",)
    assert stage.tools == ("onnx", "onnxruntime", "onnxconverter-common") and stage.reproducible
    assert list(stage.inputs) == [f"calib[{i:03d}]" for i in range(8)]  # batches x batch_size at most
    assert stage.params["method"] == "percentile" and stage.params["percentile"] == 99.9
    assert stage.params["preprocess"]["interpolation"] == "bicubic"
    with pytest.raises(ImageError):
        precision_stage(target, ArtifactRef("onnx.simplify", "demo.onnx"), "demo", [], INPUT)


def test_cpu_int8_stage_is_its_own_artifact_and_leaves_the_tensorrt_stage_fingerprint_alone(tmp_path):
    from reidbuild.manifest import OnnxInt8CpuTarget
    from reidbuild.stages.precision import int8_stage

    paths = [tmp_path / f"c{i}.png" for i in range(10)]
    cal = Calibration(images="c*.png", batches=2)
    src = ArtifactRef("onnx.simplify", "demo.onnx")
    trt = precision_stage(TensorRTTarget(mode="int8", batch_size=4, calibration=cal), src, "demo", paths, INPUT)
    cpu = int8_stage(OnnxInt8CpuTarget(calibration=cal, batch_size=4), src, "demo", paths, INPUT, cpu=True)
    ref = output_ref(cpu)
    assert ref == ArtifactRef("precision.int8_cpu", "demo.int8_cpu.onnx") and cpu.outputs == ("demo.int8_cpu.onnx",)
    cpu_params = dict(cpu.params)
    assert "graph" not in trt.params and cpu_params.pop("graph").startswith("cpu")
    assert cpu_params == trt.params and list(cpu.inputs) == list(trt.inputs)  # one recipe, one calibration rule
    with pytest.raises(ImageError, match="targets.onnx_int8_cpu.calibration.images"):
        int8_stage(OnnxInt8CpuTarget(calibration=cal), src, "demo", [], INPUT, cpu=True)


def test_fp16_and_int8_stages_run_in_the_pipeline_and_recalibrate_on_image_change(demo, tmp_path):
    calib = tmp_path / "calib"
    shutil.copytree(demo.calib_paths[0].parent, calib)
    paths = sorted(calib.glob("*.png"))
    src, ref = _source_stage(demo.onnx)
    fp16 = precision_stage(TensorRTTarget(mode="fp16", batch_size=4), ref, "demo", [], INPUT)
    target = TensorRTTarget(mode="int8", batch_size=4, calibration=Calibration(images="calib/*.png", batches=2,
                                                                                method="minmax"))
    int8 = precision_stage(target, ref, "demo", paths, INPUT)
    outcome, _ = _run([src, fp16, int8], tmp_path)
    assert outcome.ran == ["onnx.simplify", "precision.fp16", "precision.int8"] and not outcome.failed
    lock = lockfile.read(tmp_path / "m.lock")
    rec = lock.stages["precision.int8"]
    assert sorted(rec.inputs) == [f"calib[{i:03d}]" for i in range(8)]
    assert rec.record["calibration"]["images"] == 8 and len(rec.record["scales_sha256"]) == 64
    assert "demo.fp16.onnx" in lock.stages["precision.fp16"].outputs
    first = (tmp_path / "out" / "demo.int8.onnx").read_bytes()

    # unchanged: cached; and the same bytes when forced (reproducible artifact)
    outcome, _ = _run([src, fp16, int8], tmp_path)
    assert outcome.cached == ["onnx.simplify", "precision.fp16", "precision.int8"]
    outcome, _ = _run([src, fp16, int8], tmp_path, force=True)
    assert (tmp_path / "out" / "demo.int8.onnx").read_bytes() == first

    # one calibration image changes: only the int8 stage is stale, and its scales change
    from PIL import Image

    Image.new("RGB", (64, 128), (250, 10, 10)).save(paths[1])
    int8b = precision_stage(target, ref, "demo", paths, INPUT)
    plan = Planner([src, fp16, int8b], lockfile.read(tmp_path / "m.lock"), tmp_path / "out", tmp_path,
                   HashCache()).plan()
    assert [p.stage.name for p in plan if p.stale] == ["precision.int8"]
    assert plan[2].reasons == ["inputs changed: calib[001]"]
    outcome, _ = _run([src, fp16, int8b], tmp_path)
    assert outcome.ran == ["precision.int8"]
    new = lockfile.read(tmp_path / "m.lock").stages["precision.int8"].record
    assert new["scales_sha256"] != rec.record["scales_sha256"]


def test_engine_stage_declaration():
    target = TensorRTTarget(mode="fp16", batch_size=8, workspace_mib=512)
    stage = engine_stage(target, ArtifactRef("precision.fp16", "demo.fp16.onnx"), "demo")
    assert stage.name == "tensorrt.engine" and stage.outputs == ("demo.engine", "demo.timing.cache")
    assert stage.deps == ("precision.fp16",) and stage.reproducible is False
    assert stage.params["profile"] == {"min": 1, "opt": 8, "max": 8} and stage.params["workspace_mib"] == 512
    assert stage.available is not None


def test_pipeline_stops_at_the_engine_without_tensorrt_or_skips_it(demo, tmp_path, monkeypatch):
    import reidbuild.tensorrt.env as trt_env

    reason = "TensorRT is not installed (stand-in reason)"
    monkeypatch.setattr(trt_env, "available", lambda: reason)
    src, ref = _source_stage(demo.onnx)
    engine = engine_stage(TensorRTTarget(mode="fp32", batch_size=4), ref, "demo")
    with pytest.raises(Unavailable) as err:
        _run([src, engine], tmp_path)
    assert err.value.exit_code == 3 and reason in str(err.value)
    outcome, _ = _run([src, engine], tmp_path, skip_unavailable=True)
    assert outcome.skipped == ["tensorrt.engine"]
    assert lockfile.read(tmp_path / "m.lock").stages["tensorrt.engine"].record == {"reason": reason}


def test_this_machine_reports_why_engines_are_unavailable():
    from reidbuild.backends.tensorrt import available

    why = available()
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TensorRT install fails in any way
        assert why is not None and "TensorRT is not installed" in why
