from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from reidbuild.compare import compare
from reidbuild.precision import int8
from reidbuild.precision.profiles import default_tolerance

from .common import REPO, ort_features


@pytest.fixture(scope="module")
def percentile_int8(demo, tmp_path_factory):
    return int8.quantize_int8(demo.onnx, demo.calib, method="percentile", percentile=99.999,
                              workdir=tmp_path_factory.mktemp("q"))


def test_int8_percentile_passes_its_parity_profile(demo, percentile_int8):
    data, record = percentile_int8
    result = compare(demo.reference, ort_features(data, demo.parity_images), default_tolerance("onnx_int8"))
    assert result.passed, result.failures  # measured: min cosine 0.9944, rank-1 1.0, top-5 1.0
    cal = record["calibration"]
    assert cal["method"] == "percentile" and cal["percentile"] == 99.999 and cal["images"] == 16
    import hashlib

    assert cal["images_sha256"] == hashlib.sha256(demo.calib.tobytes()).hexdigest()
    # one per quantised Conv weight: 20 Conv, of which the stem and first block (3) stay float
    assert len(record["scales_sha256"]) == 64 and record["scales_per_channel"] == 17
    assert record["kept_float_stem"] > 0 and record["recipe"] == "int8-qdq-v2"


def test_int8_minmax_passes_its_parity_profile(demo, tmp_path):
    data, _ = int8.quantize_int8(demo.onnx, demo.calib, method="minmax", workdir=tmp_path)
    result = compare(demo.reference, ort_features(data, demo.parity_images), default_tolerance("onnx_int8"))
    assert result.passed, result.failures  # measured: min cosine 0.9936


def test_a_black_image_calibration_is_caught(demo, tmp_path):
    """Parity catches a bad calibration. Measured with the stem quantised too (``float_stem=False``): on this
    demo R18 (random weights, features that share one direction) a black-image calibration of the default
    recipe, whose stem and first block stay float, still scores cosine 0.9994, so only the stem's input
    range shows the damage here; tests/precision/test_trained_like.py covers the default recipe on a
    trained-like R50."""
    from PIL import Image

    from reidbuild.images import load_images

    Image.new("RGB", (64, 128)).save(tmp_path / "black.png")
    black = load_images([tmp_path / "black.png"], 256, 128)
    data, _ = int8.quantize_int8(demo.onnx, black, method="percentile", workdir=tmp_path / "w", float_stem=False)
    result = compare(demo.reference, ort_features(data, demo.parity_images), default_tolerance("onnx_int8"))
    assert not result.passed
    assert any("min cosine" in f for f in result.failures)  # measured 0.9836 < 0.99


def test_qdq_graph_is_what_tensorrt_explicit_quantisation_takes(demo, percentile_int8):
    data, _ = percentile_int8
    model = onnx.load_from_string(data)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        assert inits[n.input[2]].dtype == np.int8 and not inits[n.input[2]].any()  # symmetric int8
    from reidbuild.precision.graph import first_block

    stem = set(first_block(onnx.load_from_string(demo.onnx)))
    assert sum(n.op_type == "Conv" for n in model.graph.node if n.name in stem) == 3  # kept float on purpose
    for conv in (n for n in model.graph.node if n.op_type == "Conv" and n.name not in stem):
        w_dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
        assert w_dq.op_type == "DequantizeLinear" and inits[w_dq.input[0]].dtype == np.int8
        assert inits[w_dq.input[1]].size == inits[w_dq.input[0]].shape[0]  # per output channel
        if len(conv.input) > 2:  # biases stay float: TensorRT cannot dequantise int32
            assert conv.input[2] in inits and inits[conv.input[2]].dtype == np.float32
    # the head after the last conv (final Add/Relu, pooling, BN neck) stays float
    last = [n.op_type for n in model.graph.node][-5:]
    assert "QuantizeLinear" not in last and "DequantizeLinear" not in last


def test_int8_bytes_are_identical_in_another_process(demo, percentile_int8, tmp_path):
    """Byte-identical across runs and across Python hash seeds (set iteration order inside the quantiser)."""
    (tmp_path / "m.onnx").write_bytes(demo.onnx)
    np.save(tmp_path / "calib.npy", demo.calib)
    code = ("import sys, numpy as np, pathlib; from reidbuild.precision.int8 import quantize_int8; "
            "d = pathlib.Path(sys.argv[1]); "
            "out, _ = quantize_int8((d / 'm.onnx').read_bytes(), np.load(d / 'calib.npy'), method='percentile', "
            "percentile=99.999, workdir=d / 'work'); (d / 'out.onnx').write_bytes(out)")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, cwd=tmp_path, timeout=120)
    assert (tmp_path / "out.onnx").read_bytes() == percentile_int8[0]


def test_changing_one_calibration_image_changes_the_scales(demo, percentile_int8, tmp_path):
    calib = demo.calib.copy()
    calib[3] = 255.0 - calib[3]
    _, record = int8.quantize_int8(demo.onnx, calib, method="percentile", workdir=tmp_path)
    assert record["calibration"]["images_sha256"] != percentile_int8[1]["calibration"]["images_sha256"]
    assert record["scales_sha256"] != percentile_int8[1]["scales_sha256"]


def test_entropy_runs_and_the_fast_threshold_search_equals_onnxruntimes():
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(0)
    collector = HistogramCollector(method="entropy", symmetric=True, num_bins=512, num_quantized_bins=128,
                                   percentile=99.999, scenario="same")
    samples = {"relu": np.maximum(rng.normal(size=5000), 0), "gauss": 3 * rng.normal(size=5000),
               "heavy": rng.standard_t(2, size=5000), "sparse": np.where(rng.random(5000) < 0.02, rng.normal(size=5000), 0)}
    for bins in (256, 600):
        for name, values in samples.items():
            collector.histogram_dict, collector.num_bins = {}, bins
            collector.collect_value({name: [values.astype(np.float32)]})
            hist = collector.histogram_dict[name]
            for qbins in (128, 256):
                assert int8.entropy_threshold(hist, qbins) == collector.get_entropy_threshold(hist, qbins), (name, bins)


def test_range_rounding_is_outward_and_float32_exact():
    for v in (1e-3, 0.1, 2.6400001, 123.456, 7.0):
        up, down = int8._round_up(v), int8._round_down(-v)
        assert up >= v and down <= -v and up == -down
        assert up - v <= v * 2.0 ** -(int8.RANGE_BITS - 1)
        assert float(np.float32(up)) == up
    assert int8._round_up(0.0) == 0.0


def test_bad_inputs_are_stage_failures(demo, tmp_path):
    from reidbuild.errors import StageFailed

    with pytest.raises(StageFailed, match="unknown calibration method"):
        int8.quantize_int8(demo.onnx, demo.calib, method="kl", workdir=tmp_path)
    with pytest.raises(StageFailed, match="no calibration images"):
        int8.quantize_int8(demo.onnx, demo.calib[:0], method="minmax", workdir=tmp_path)
    with pytest.raises(StageFailed, match="cannot read"):
        int8.quantize_int8(b"not onnx", demo.calib, method="minmax", workdir=tmp_path)


def test_the_cpu_int8_graph_runs_every_conv_as_an_int8_kernel(demo, tmp_path):
    """``cpu=True`` (uint8 activations, int32 biases) is what onnxruntime's CPU kernels fuse: after its graph
    optimisation no quantised Conv is left as a float Conv; the TensorRT-facing graph leaves some (the Convs
    reading a residual block's input). Both keep the parity profile."""
    import onnxruntime as ort

    counts = {}
    for cpu in (False, True):
        data, record = int8.quantize_int8(demo.onnx, demo.calib, method="percentile", workdir=tmp_path / str(cpu),
                                          cpu=cpu)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"opt{cpu}.onnx")
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
        counts[cpu] = (ops.count("Conv"), ops.count("QLinearConv"))
        result = compare(demo.reference, ort_features(data, demo.parity_images), default_tolerance("onnx_int8"))
        assert result.passed, (cpu, result.failures)
    stem_convs = 3
    assert counts[True] == (stem_convs, 20 - stem_convs), counts
    assert counts[False][0] > stem_convs, counts  # float Convs besides the stem: the blocked ones
