"""``targets.onnx_int8_cpu``: the int8 ONNX for onnxruntime's CPU kernels, built by ``apply`` on a trained-like
fast-reid R18 (BN statistics measured on person-like images), proven by ``parity.onnx_int8_cpu`` with the
default int8 thresholds, run by ``infer``, and fused by onnxruntime into QLinearConv (not float Conv)."""
from __future__ import annotations

import collections
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reidbuild import lockfile
from reidbuild.cli import main
from reidbuild.precision.profiles import default_tolerance

from .common import REPO

H, W = 128, 64
MANIFEST = """\
    version: 1
    name: r18
    source:
      format: fastreid
      config: {config}
      weights: model_final.pth
    input:
      height: {h}
      width: {w}
    output_dir: out
    targets:
      onnx_int8_cpu:
        calibration:
          images: calib/*.png
          batches: 4
    parity:
      images: imgs/*.png
      backends: [onnxruntime]
      atol: 1.0e-3   # trained-like features are O(0.1): 1e-6 absolute is below float32 noise
    """


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        arr = np.clip(np.round(img.transpose(1, 2, 0)), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(folder / f"p{i:03d}.png")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from reidbuild.fastreid import build_model
    from reidbuild.fastreid.checkpoint import make_checkpoint
    from reidbuild.fastreid.config import load_config
    from reidbuild.testing import make_trained_like, person_like_images

    root = tmp_path_factory.mktemp("int8cpu")
    config = REPO / "configs" / "demo_R18.yml"
    model = build_model(load_config(config))
    make_trained_like(model, person_like_images(64, H, W, seed=1), seed=0)
    make_checkpoint(model, root / "model_final.pth")
    _write_pngs(root / "imgs", person_like_images(12, H, W, seed=2))
    _write_pngs(root / "calib", person_like_images(40, H, W, seed=5))
    manifest = root / "m.yml"
    manifest.write_text(textwrap.dedent(MANIFEST).format(config=config, h=H, w=W))
    r = CliRunner().invoke(main, ["apply", str(manifest)], catch_exceptions=False)
    return root, manifest, r


def test_apply_builds_the_cpu_int8_onnx_and_proves_it_with_the_default_int8_thresholds(built):
    root, manifest, r = built
    assert r.exit_code == 0, r.output
    assert (root / "out" / "r18.int8_cpu.onnx").is_file()
    assert not (root / "out" / "r18.int8.onnx").exists()  # the TensorRT-facing graph is another target
    lock = lockfile.read(manifest.with_suffix(".lock"))
    stage = lock.stages["precision.int8_cpu"]
    assert stage.status == "ok" and "r18.int8_cpu.onnx" in stage.outputs
    assert len(stage.inputs) == 32  # batches x batch_size (4 x 8) of the 40 calibration images
    assert stage.record["activations"].startswith("uint8") and stage.record["bias"].startswith("int32")
    parity = lock.stages["parity.onnx_int8_cpu"]
    assert parity.status == "ok"
    assert parity.params["tolerance"] == default_tolerance("onnx_int8_cpu") == default_tolerance("onnx_int8")
    assert parity.record["min_cosine"] >= 0.99  # measured 0.997
    artifact = root / "out" / "r18.int8_cpu.onnx"
    good = artifact.read_bytes()
    try:  # the lock holds the artifact's hash: verify catches a flipped byte in it
        artifact.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        v = CliRunner().invoke(main, ["verify", str(manifest)])
        assert v.exit_code == 1 and "r18.int8_cpu.onnx" in v.output, v.output
    finally:
        artifact.write_bytes(good)


def test_onnxruntime_runs_every_quantised_conv_as_qlinearconv(built, tmp_path):
    """The point of this artifact: in onnxruntime's optimised graph each Conv that reads a DequantizeLinear is a
    QLinearConv; only the Convs the recipe keeps float (stem, first residual block) stay Conv."""
    import onnx

    root, _m, r = built
    assert r.exit_code == 0, r.output
    artifact = root / "out" / "r18.int8_cpu.onnx"
    graph = onnx.load(str(artifact)).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantised = [n for n in convs if made_by.get(n.input[0]) == "DequantizeLinear"]
    assert len(quantised) >= 12  # R18: 20 Conv, of which the stem and first block stay float
    kernels = _optimized_kernels(artifact.read_bytes(), tmp_path / "cpu.onnx")
    assert kernels["QLinearConv"] == len(quantised), kernels
    assert kernels["Conv"] + kernels["FusedConv"] == len(convs) - len(quantised), kernels
    # the contrast that makes this a separate artifact: the TensorRT-facing graph of the same model, calibrated
    # on the same images, leaves the Convs that share their input with a residual Add in float
    from reidbuild.images import load_images
    from reidbuild.precision import int8

    calib = load_images(sorted((root / "calib").glob("*.png"))[:32], H, W)
    trt, _ = int8.quantize_int8((root / "out" / "r18.onnx").read_bytes(), calib, method="percentile",
                                workdir=tmp_path / "trt")
    assert _optimized_kernels(trt, tmp_path / "trt.onnx")["QLinearConv"] < len(quantised)


def _optimized_kernels(data: bytes, dump: Path) -> collections.Counter:
    """Op types of the graph onnxruntime actually runs (its optimised-model dump, all optimisations on)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dump)
    ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(dump)).graph.node)


def test_infer_runs_the_cpu_int8_onnx(built, tmp_path):
    from reidbuild.testing import feature_cosines

    root, manifest, r = built
    assert r.exit_code == 0, r.output
    feats = {}
    for backend in ("onnx_int8_cpu", "torch"):
        out = tmp_path / backend
        res = CliRunner().invoke(main, ["infer", str(manifest), "--backend", backend, "--input",
                                        str(root / "imgs" / "*.png"), "--output", str(out)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        feats[backend] = np.stack([np.load(p) for p in sorted(out.glob("*.npy"))])
    assert len(feats["torch"]) == 12
    cos = feature_cosines(np.concatenate([feats["onnx_int8_cpu"], feats["torch"]]))
    assert np.diag(cos[:12, 12:]).min() >= 0.99


def test_noop_apply_with_the_target_imports_nothing_heavy(built):
    """Planning the int8 stages reads only the tolerance profiles: no numpy, onnx or torch on a no-op."""
    from tests.helpers import apply_in_fresh_interpreter

    _root, manifest, r = built
    assert r.exit_code == 0, r.output
    code, out, err, heavy = apply_in_fresh_interpreter(manifest)
    assert code == 0 and "nothing to do" in out, err
    assert heavy == [], f"a no-op apply imported {heavy}"


def test_the_target_needs_a_parity_section(tmp_path):
    text = textwrap.dedent(MANIFEST).format(config=REPO / "configs" / "demo_R18.yml", h=H, w=W)
    manifest = tmp_path / "m.yml"
    manifest.write_text(text[: text.index("parity:")])
    r = CliRunner().invoke(main, ["apply", str(manifest)])
    assert r.exit_code == 2, r.output
    assert "targets.onnx_int8_cpu needs a parity section" in r.output
