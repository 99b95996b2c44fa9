"""The shared self-check (reidbuild.selfcheck): realistic probe images, blame only where the reference is finite,
differences judged on the output's own scale, fixed batch sizes honoured."""
from __future__ import annotations

import numpy as np
import pytest

from reidbuild import selfcheck
from reidbuild.errors import StageFailed
from reidbuild.probe import Probe, probe_images

PROBE = Probe(np.zeros((3, 3, 8, 4), np.float32), ["a.jpg", "b.jpg", "c.jpg"], "parity images")


def test_probe_is_parity_images_or_deterministic_person_like_images(tmp_path):
    from PIL import Image

    p = probe_images(32, 16)
    assert p.source == "person-like images" and p.images.shape == (4, 3, 32, 16)
    assert np.array_equal(p.images, probe_images(32, 16).images)  # deterministic
    assert 0 <= p.images.min() and p.images.max() <= 255 and p.images.std() > 20  # a photograph's range
    bgr = probe_images(32, 16, color="BGR")
    assert np.array_equal(bgr.images, p.images[:, ::-1])
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"im{i}.png")
        Image.new("RGB", (20, 40), (10 * i, 20, 30)).save(paths[-1])
    q = probe_images(32, 16, paths=paths)
    assert q.source == "parity images" and q.names == ["im0.png", "im1.png", "im2.png", "im3.png"]
    assert q.describe() == {"source": "parity images", "images": q.names}


def test_non_finite_is_blamed_only_where_the_reference_is_finite():
    out = np.ones((3, 4))
    out[1, 2] = np.nan
    ref_same = out.copy()
    notes = selfcheck.judge_finite(out, PROBE, "m.onnx", lambda: ref_same, "PyTorch")
    assert len(notes) == 1 and "PyTorch gives non-finite features on b.jpg too" in notes[0]
    with pytest.raises(StageFailed, match=r"m.onnx: onnxruntime gives non-finite outputs on b.jpg .* where PyTorch"):
        selfcheck.judge_finite(out, PROBE, "m.onnx", lambda: np.ones((3, 4)), "PyTorch")
    calls = []
    assert selfcheck.judge_finite(np.ones((3, 4)), PROBE, "m", lambda: calls.append(1), "PyTorch") == []
    assert not calls  # the reference is computed only when needed


def test_same_graph_is_judged_on_the_output_scale():
    before = np.array([[3.5e9, 1.0], [2.0e9, -4.0], [1.0e9, 0.5]])
    # the SBS case: 4.4e4 apart on outputs of 3.5e9 is float noise (1.3e-5 of the scale)
    assert selfcheck.check_same(before + 4.4e4, before, PROBE, "sim.onnx") < selfcheck.SCALE_BOUND
    with pytest.raises(StageFailed, match=r"sim.onnx: the result differs .* by 0.01 of the output's scale"):
        selfcheck.check_same(before + 3.5e7, before, PROBE, "sim.onnx")
    nan_before = before.copy()
    nan_before[2, 0] = np.nan
    after = before.copy()
    after[2] = np.nan  # non-finite where the graph before was non-finite too: not this step's fault
    assert selfcheck.check_same(after, nan_before, PROBE, "sim.onnx") == 0.0
    with pytest.raises(StageFailed, match="on a.jpg"):
        bad = before.copy()
        bad[0, 0] = np.inf
        selfcheck.check_same(bad, before, PROBE, "sim.onnx")


def _onnx_scale(batch):
    """A tiny graph: output = input * 2 flattened, with a fixed or symbolic batch."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 96])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1])
    nodes = [helper.make_node("Mul", ["input", "two"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["output"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [two, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("batch", ["N", 1, 2])
def test_features_of_every_image_whatever_the_batch_size(batch):
    images = np.random.default_rng(0).uniform(0, 255, (5, 3, 8, 4)).astype(np.float32)
    out = selfcheck.features(_onnx_scale(batch), images, "m.onnx")
    assert out.shape == (5, 96) and np.allclose(out, images.reshape(5, -1) * 2)


def test_unloadable_model_is_a_stage_failure():
    with pytest.raises(StageFailed, match="m.onnx: onnxruntime cannot load the model"):
        selfcheck.features(b"not onnx", np.zeros((1, 3, 8, 4), np.float32), "m.onnx")
