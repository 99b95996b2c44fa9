"""The README's R50 example manifest, as written, on a real-format fast-reid R50 checkpoint (seeded, made here).

ONNX, Caffe and the fp16 ONNX are built and proven; the TensorRT engine needs TensorRT and a GPU, which this
machine lacks: apply stops with exit 3 naming it, or records it as skipped with --skip-unavailable.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from reidbuild import lockfile
from reidbuild.cli import main

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from reidbuild.fastreid import build_model
    from reidbuild.fastreid.checkpoint import init_random, make_checkpoint
    from reidbuild.fastreid.config import load_config

    root = tmp_path_factory.mktemp("user")
    for d in ("configs", "manifests", "test_data"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("*.lock"))
    ckpt = root / "logs" / "market1501" / "bagtricks_R50" / "model_final.pth"
    ckpt.parent.mkdir(parents=True)
    model = build_model(load_config(root / "configs" / "market1501" / "bagtricks_R50" / "config.yml"))
    init_random(model, 50)
    make_checkpoint(model, ckpt)  # fast-reid's layout: model + optimizer + schedulers + epoch, classifier inside
    return root


def test_example_builds_everything_this_machine_can_then_names_tensorrt(project):
    from reidbuild.backends import tensorrt

    if tensorrt.available() is None:
        pytest.skip("TensorRT and a GPU are present: tests/gpu covers the engine")
    m = str(project / "manifests" / "market1501_bagtricks_R50.yml")
    code, out, err = cli("validate", m)
    assert code == 0 and "valid (11 stages)" in out, err  # the last is the report
    code, out, err = cli("apply", m)
    assert code == 3, err
    assert "error: stage tensorrt.engine: " in err and "(use --skip-unavailable" in err
    lock = lockfile.read(project / "manifests" / "market1501_bagtricks_R50.lock")
    for stage in ("load", "onnx.export", "onnx.simplify", "caffe.convert", "precision.fp16", "parity.onnx_fp16",
                  "parity.onnxruntime", "parity.caffe"):
        assert lock.stages[stage].status == "ok", stage
    assert lock.stages["parity.caffe"].record["passed"] and lock.stages["parity.caffe"].record["max_abs"] < 1e-4
    assert lock.stages["parity.onnx_fp16"].record["min_cosine"] >= 0.999
    assert "tensorrt.engine" not in lock.stages

    code, out, err = cli("apply", "--skip-unavailable", m)
    assert code == 0, err
    lock = lockfile.read(project / "manifests" / "market1501_bagtricks_R50.lock")
    assert lock.stages["tensorrt.engine"].status == "skipped"
    assert lock.stages["parity.tensorrt"].status == "skipped"
    # the report is written for the checks that ran and names the one that could not
    assert lock.stages["report"].status == "ok"
    page = (project / "outputs" / "baseline_R50" / "baseline_R50.report.html").read_text()
    assert 'id="retrieval-caffe"' in page and 'id="retrieval-onnx_fp16"' in page
    assert 'id="check-tensorrt"' in page and 'id="retrieval-tensorrt"' not in page
    assert '<a href="#check-tensorrt">tensorrt</a></td><td class="skip">SKIPPED' in page

    code, out, err = cli("apply", "--locked", "--skip-unavailable", m)
    assert code == 0, err
    assert "skipped stages (not checked): tensorrt.engine, parity.tensorrt" in err
