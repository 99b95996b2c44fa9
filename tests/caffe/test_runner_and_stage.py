"""The Caffe Runner (pycaffe / OpenCV) and the caffe.convert stage inside the pipeline."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from torch import nn

from reidbuild import lockfile, pipeline
from reidbuild.backends import caffe as backend
from reidbuild.backends.base import Runner, run_batched
from reidbuild.errors import StageFailed, Unavailable
from reidbuild.manifest import CaffeTarget
from reidbuild.pipeline import Stage, StageResult
from reidbuild.stages import ArtifactRef, output_ref
from reidbuild.stages.caffe import caffe_stage
from tests.caffe._util import export, need, rand, torch_ref, write_caffe


def _tiny():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


def test_available_explains_how_to_install(monkeypatch):
    assert "unknown Caffe runtime" in backend.available("tensorrt")
    monkeypatch.setitem(sys.modules, "caffe", None)  # import caffe -> ImportError
    why = backend.available("pycaffe")
    assert why is not None and "make pycaffe" in why and "\n" not in why
    monkeypatch.setitem(sys.modules, "cv2", None)
    assert "opencv-python-headless<5" in backend.available("opencv")
    auto = backend.available("auto")
    assert "make pycaffe" in auto and "opencv-python-headless<5" in auto
    with pytest.raises(Unavailable):
        backend.resolve_runtime("auto")


@pytest.mark.parametrize("runtime", ["pycaffe", "opencv"])
def test_runner_protocol_describe_and_any_batch(runtime, tmp_path):
    need(runtime)
    module = _tiny()
    proto, caffemodel, _ = write_caffe(tmp_path, export(module, (1, 3, 8, 6)), "ceil_mode", (2, 3, 8, 6))
    r = backend.CaffeRunner(proto, caffemodel, runtime)
    assert isinstance(r, Runner) and r.name == "caffe"
    d = r.describe()
    assert d["runtime"] == runtime and d["version"] and d["device"] == "cpu"
    x = rand((5, 3, 8, 6), seed=1, low=0, high=255)
    out = run_batched(r, x, 2)  # chunks of 2, 2, 1: the last one reshapes the net
    # float32 sums of 27-term convolutions of 0..255 inputs: rtol=1e-5, atol=1e-4 (values ~10..100)
    np.testing.assert_allclose(out, torch_ref(module, x), rtol=1e-5, atol=1e-4)
    assert r.infer(x[:3]).shape == (3, 5)


def test_auto_prefers_pycaffe(tmp_path):
    need("pycaffe")
    proto, caffemodel, _ = write_caffe(tmp_path, export(_tiny(), (1, 3, 8, 6)), "bvlc", (1, 3, 8, 6))
    assert backend.CaffeRunner(proto, caffemodel).runtime == "pycaffe"


@pytest.mark.parametrize("runtime", ["pycaffe", "opencv"])
def test_batch_specific_net_is_run_at_its_own_batch(runtime, tmp_path):
    """A (hand-edited) net whose Reshape hard-codes N is fed padded chunks of N, never reshaped."""
    need(runtime)
    module = _tiny()
    proto, caffemodel, text = write_caffe(tmp_path, export(module, (1, 3, 8, 6)), "bvlc", (2, 3, 8, 6))
    text = text.replace('type: "Flatten"', 'type: "Reshape"\n  reshape_param {\n    shape {\n      dim: 2\n'
                                           '      dim: -1\n    }\n  }')
    proto.write_text(text)
    r = backend.CaffeRunner(proto, caffemodel, runtime)
    assert not r.batch_agnostic
    x = rand((3, 3, 8, 6), seed=2, low=0, high=255)
    np.testing.assert_allclose(r.infer(x), torch_ref(module, x), rtol=1e-5, atol=1e-4)


def test_runner_rejects_wrong_input(tmp_path):
    need("opencv")
    proto, caffemodel, _ = write_caffe(tmp_path, export(_tiny(), (1, 3, 8, 6)), "bvlc", (1, 3, 8, 6))
    r = backend.CaffeRunner(proto, caffemodel, "opencv")
    with pytest.raises(StageFailed, match="expects"):
        r.infer(np.zeros((1, 3, 6, 8), np.float32))
    with pytest.raises(StageFailed, match="not found"):
        backend.CaffeRunner(proto, tmp_path / "missing.caffemodel", "opencv")


@pytest.mark.parametrize("dialect", ["bvlc", "ceil_mode"])
def test_stage_in_the_pipeline(dialect, tmp_path):
    onnx_bytes = export(_tiny(), (1, 3, 16, 8)).SerializeToString(deterministic=True)
    source = Stage("onnx.simplify", lambda ctx: StageResult({"m.onnx": onnx_bytes}), outputs=("m.onnx",))
    target = CaffeTarget(dialect=dialect, batch_size=2)
    stage = caffe_stage(target, (16, 8), ArtifactRef("onnx.simplify", "m.onnx"), "tiny")
    proto_ref, model_ref = output_ref(stage, 0), output_ref(stage, 1)
    assert (stage.name, stage.deps, stage.tools) == ("caffe.convert", ("onnx.simplify",), ("onnx", "protobuf"))
    assert (proto_ref.file, model_ref.file) == ("tiny.prototxt", "tiny.caffemodel")
    assert stage.params["dialect"] == dialect and stage.params["batch_size"] == 2 and stage.params["input"] == [16, 8]
    assert stage.params["converter"]
    out, lock_path = tmp_path / "out", tmp_path / "m.lock"

    def go(**kw):
        return pipeline.run([source, stage], lock_path=lock_path, manifest_entry={}, output_dir=out, base=tmp_path,
                            emit=lambda e: None, **kw)

    first = go()
    assert first.ran == ["onnx.simplify", "caffe.convert"]
    rec = lockfile.read(lock_path).stages["caffe.convert"]
    assert rec.record["dialect"] == dialect and rec.record["layers"] == sum(rec.record["layer_types"].values())
    assert rec.record["layer_types"]["Convolution"] == 1 and rec.record["output_shape"] == [2, 5]
    proto_bytes, model_bytes = (out / "tiny.prototxt").read_bytes(), (out / "tiny.caffemodel").read_bytes()
    again = go(force=True)  # byte-identical run after run
    assert again.ran == ["onnx.simplify", "caffe.convert"]
    assert (out / "tiny.prototxt").read_bytes() == proto_bytes and (out / "tiny.caffemodel").read_bytes() == model_bytes
    assert go(locked=True).cached == ["onnx.simplify", "caffe.convert"]


def test_stage_reports_a_refusal(tmp_path):
    class Perm(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1)

    (tmp_path / "m.onnx").write_bytes(export(Perm(), (1, 3, 8, 4)).SerializeToString())
    stage = caffe_stage(CaffeTarget(dialect="bvlc"), (8, 4), ArtifactRef("onnx.simplify", "m.onnx"), "x")
    from reidbuild.errors import NotExpressible

    with pytest.raises(NotExpressible, match="of op Transpose is not expressible in Caffe dialect bvlc"):
        stage.run(pipeline.StageContext(tmp_path, {}, lambda m: None))
    (tmp_path / "m.onnx").write_bytes(b"not onnx")
    with pytest.raises(StageFailed, match="not a readable ONNX model"):
        stage.run(pipeline.StageContext(tmp_path, {}, lambda m: None))


def test_pycaffe_problems_are_errors_not_aborts(tmp_path):
    """libcaffe aborts the process on a bad prototxt; the runner checks first and raises instead."""
    need("pycaffe")
    proto, caffemodel, text = write_caffe(tmp_path, export(_tiny(), (1, 3, 8, 6)), "ceil_mode", (1, 3, 8, 6))
    assert backend.CaffeRunner(proto, caffemodel, "pycaffe").describe()["pooling_field_13"] == "ceil_mode"
    proto.write_text(text.replace("ceil_mode: false", "round_mode: FLOOR"))
    with pytest.raises(StageFailed, match="cannot parse the prototxt"):
        backend.CaffeRunner(proto, caffemodel, "pycaffe")
    proto.write_text(text)
    caffemodel.write_bytes(b"\xff\xff\xff")
    with pytest.raises(StageFailed, match="not a Caffe NetParameter"):
        backend.CaffeRunner(proto, caffemodel, "pycaffe")


def test_pycaffe_one_image_at_a_time_equals_a_batched_forward(tmp_path):
    """pycaffe keeps every blob of the whole batch, so the runner feeds a batch-agnostic net one image at a
    time (a quarter of the memory of parity's batches of four on an R50); the features are bit-identical to
    one forward of the whole batch through pycaffe itself."""
    need("pycaffe")
    import caffe  # pycaffe itself, as the reference for one batched forward
    proto, caffemodel, _ = write_caffe(tmp_path, export(_tiny(), (1, 3, 8, 6)), "ceil_mode", (1, 3, 8, 6))
    x = rand((4, 3, 8, 6), seed=3, low=0, high=255)
    net = caffe.Net(str(proto), str(caffemodel), caffe.TEST)
    net.blobs["input"].reshape(*x.shape)
    net.reshape()
    net.blobs["input"].data[...] = x
    net.forward()
    batched = np.array(net.blobs["output"].data, dtype=np.float32).reshape(4, -1)
    runner = backend.CaffeRunner(proto, caffemodel, "pycaffe")
    assert runner.batch_agnostic
    np.testing.assert_array_equal(runner.infer(x), batched)
