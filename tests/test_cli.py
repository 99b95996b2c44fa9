"""The CLI end to end on a tiny fast-reid R18 (64x32): apply, caching, lock, verify, infer, exit codes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from reidbuild import lockfile
from reidbuild.cli import main
from tests.helpers import tiny_manifest, tiny_model, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def subprocess_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reidbuild.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    m = tiny_manifest(root)
    code, out, err = cli("apply", str(m))
    assert code == 0, err
    return root, m


def test_apply_builds_onnx_lock_and_passing_parity(built):
    root, m = built
    model = onnx.load(root / "out" / "tiny.onnx")
    inp, outp = model.graph.input[0], model.graph.output[0]
    assert inp.name == "input" and outp.name == "output"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 64, 32]
    assert [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim] == ["batch", 512]
    lock = lockfile.read(root / "m.lock")
    assert list(lock.stages) == ["load", "onnx.export", "onnx.simplify", "parity.onnxruntime", "report"]
    par = lock.stages["parity.onnxruntime"]
    assert par.status == "ok" and par.record["passed"] and par.record["images"] == 5
    assert par.record["max_abs"] < 1e-4 and par.record["min_cosine"] > 0.99999
    assert lock.stages["onnx.export"].record["exporter"].startswith("torch.onnx TorchScript")


def test_second_apply_runs_no_stage(built):
    root, m = built
    code, out, err = cli("apply", str(m))
    assert code == 0 and "nothing to do" in out
    assert "running" not in err


def test_artifacts_are_byte_identical_when_rebuilt_and_locked_passes(built, tmp_path):
    root, m = built
    lock_text = (root / "m.lock").read_text()
    copy = tmp_path / "elsewhere"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("out"))
    code, out, err = cli("apply", "--locked", str(copy / "m.yml"))
    assert code == 0, err
    for name in ("tiny.export.onnx", "tiny.onnx", "tiny.fastreid.json"):
        assert (copy / "out" / name).read_bytes() == (root / "out" / name).read_bytes(), name
    assert (copy / "m.lock").read_text() == lock_text


def test_locked_fails_when_manifest_changes_and_keeps_lock(built, tmp_path):
    root, _ = built
    copy = tmp_path / "p"
    shutil.copytree(root, copy)
    m = copy / "m.yml"
    m.write_text(m.read_text().replace("output_dir: out", "output_dir: out\ntargets:\n  onnx:\n    opset: 16"))
    before = (copy / "m.lock").read_text()
    code, out, err = cli("apply", "--locked", str(m))
    assert code == 1 and "onnx.export differs from the lock" in err and "opset" in err
    assert (copy / "m.lock").read_text() == before
    code, out, err = cli("plan", str(m))
    assert code == 0 and "parameters changed: opset" in out and "ok   load" in out
    code, out, err = cli("apply", str(m))
    assert code == 0
    assert "load: up to date" in err and "onnx.export: running" in err


def test_verify_catches_flipped_byte_and_replaced_input(built, tmp_path):
    root, _ = built
    copy = tmp_path / "v"
    shutil.copytree(root, copy)
    m = str(copy / "m.yml")
    code, out, _ = cli("verify", m)
    assert code == 0 and "verified" in out
    art = copy / "out" / "tiny.onnx"
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0x01
    art.write_bytes(bytes(data))
    code, out, err = cli("verify", m)
    assert code == 1 and "artifact tiny.onnx differs from the lock" in out
    shutil.copy(root / "out" / "tiny.onnx", art)
    (copy / "cfg" / "config.yml").write_text((copy / "cfg" / "config.yml").read_text() + "\n# edited\n")
    code, out, err = cli("verify", m)
    assert code == 1 and "input config cfg/config.yml changed" in out


def test_json_output(built):
    root, m = built
    code, out, _ = cli("apply", "--json", str(m))
    doc = json.loads(out)
    assert code == 0 and doc["ran"] == [] and len(doc["cached"]) == 5
    code, out, _ = cli("plan", "--json", str(m))
    assert [s["stale"] for s in json.loads(out)["stages"]] == [False] * 5


def test_infer_writes_features_equal_to_torch(built, tmp_path):
    root, m = built
    outdir = tmp_path / "feats"
    code, out, err = cli("infer", str(m), "--backend", "onnxruntime", "--input", str(root / "imgs" / "*.png"),
                         "--output", str(outdir))
    assert code == 0, err
    code, _, err = cli("infer", str(m), "--backend", "torch", "--input", str(root / "imgs" / "*.png"),
                       "--output", str(tmp_path / "ref"))
    assert code == 0, err
    files = sorted(outdir.glob("*.npy"))
    assert [f.name for f in files] == [f"im{i}.npy" for i in range(5)]
    for f in files:
        a, r = np.load(f), np.load(tmp_path / "ref" / f.name)
        assert a.shape == (512,)
        np.testing.assert_allclose(a, r, rtol=1e-3, atol=1e-4)


def test_parity_failure_exits_1_with_table_and_is_locked_as_failed(tmp_path):
    m = tiny_manifest(tmp_path)
    m.write_text(m.read_text().replace("backends: [onnxruntime]", "backends: [onnxruntime]\n  rtol: 0.0\n  atol: 0.0"))
    code, out, err = cli("apply", str(m))
    assert code == 1
    assert "parity onnxruntime:" in err and "values outside rtol=0.0 atol=0.0" in err
    assert "im0.png" in err and "cosine" in err  # the per-image table
    assert lockfile.read(tmp_path / "m.lock").stages["parity.onnxruntime"].status == "failed"
    code, out, err = cli("verify", str(m))
    assert code == 1 and "recorded as failed" in out


def test_checkpoint_in_fastreid_format_is_used(tmp_path):
    import torch

    m = tiny_manifest(tmp_path, weights="model_final.pth")
    model = tiny_model(tmp_path, 123)
    write_checkpoint(model, tmp_path / "model_final.pth")
    assert {"model", "optimizer"} <= set(torch.load(tmp_path / "model_final.pth", weights_only=True))
    code, out, err = cli("apply", str(m))
    assert code == 0, err
    x = torch.rand(2, 3, 64, 32) * 255
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "out" / "tiny.onnx"))
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model.eval()(x).detach().numpy(),
                               rtol=1e-3, atol=1e-4)
    # a replaced checkpoint re-runs the build and verify sees it before
    write_checkpoint(tiny_model(tmp_path, 124), tmp_path / "model_final.pth")
    code, out, _ = cli("verify", str(m))
    assert code == 1 and "input weights model_final.pth changed" in out
    code, out, err = cli("apply", str(m))
    assert code == 0 and "inputs changed: weights" in err


@pytest.mark.parametrize("mutate,code_expected,needle", [
    (lambda t: t.replace("height: 64", "height: -1"), 2, "input.height"),
    (lambda t: t.replace("cfg/config.yml", "cfg/missing.yml"), 2, "missing.yml"),
    (lambda t: t.replace("imgs/*.png", "nothing/*.png"), 2, "matches no file"),
    (lambda t: t.replace("{random: {seed: 1}}", "missing.pth"), 2, "missing.pth"),
])
def test_bad_input_is_one_line_with_exit_2_and_no_traceback(tmp_path, mutate, code_expected, needle):
    m = tiny_manifest(tmp_path)
    m.write_text(mutate(m.read_text()))
    r = subprocess_cli("apply", str(m))
    assert r.returncode == code_expected, r.stderr
    assert "Traceback" not in r.stderr and needle in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "m.lock").exists()


def test_schema_and_validate_commands(repo_manifest=REPO / "manifests" / "demo.yml"):
    code, out, _ = cli("schema")
    assert code == 0 and json.loads(out)["title"] == "reidbuild manifest"
    code, out, err = cli("validate", str(repo_manifest))
    assert code == 0 and "valid" in out, err


def test_verify_explains_an_engine_from_another_machine(built, tmp_path):
    """An engine's bytes are not reproducible: a mismatch names the recorded TensorRT/GPU, not just a hash."""
    root, _ = built
    copy = tmp_path / "e"
    shutil.copytree(root, copy)
    lock_path = copy / "m.lock"
    lock = lockfile.read(lock_path)
    env = {"tensorrt": "11.4.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
           "cuda_runtime": "13.0", "cuda_driver": "13.0"}
    (copy / "out" / "tiny.engine").write_bytes(b"engine bytes from this machine")
    lock.stages["tensorrt.engine"] = lockfile.StageRecord(
        fingerprint="x", status="ok",
        outputs={"tiny.engine": {"path": "out/tiny.engine", "sha256": "0" * 64, "size": 3, "reproducible": False}},
        record={"environment": env})
    lockfile.write(lock_path, lock)
    code, out, _ = cli("verify", str(copy / "m.yml"))
    assert code == 1
    line = next(x for x in out.splitlines() if "tiny.engine" in x)
    assert "built with TensorRT 11.4.0 on NVIDIA H100 80GB HBM3" in line


def test_locked_fails_on_a_manifest_only_edit_and_on_a_removed_target(built, tmp_path):
    root, _ = built
    copy = tmp_path / "l"
    shutil.copytree(root, copy)
    m = copy / "m.yml"
    m.write_text(m.read_text() + "# a comment only\n")
    code, out, err = cli("apply", "--locked", str(m))
    assert code == 1 and "the manifest changed since the lock was written" in err
    lock = lockfile.read(copy / "m.lock")
    lock.stages["caffe.convert"] = lockfile.StageRecord(fingerprint="x", status="ok")
    lockfile.write(copy / "m.lock", lock)
    m.write_text(m.read_text().replace("# a comment only\n", ""))
    code, out, err = cli("apply", "--locked", str(m))
    assert code == 1 and "stages this manifest no longer builds: caffe.convert" in err
    code, out, _ = cli("verify", str(m))
    assert code == 1 and "caffe.convert is in the lock but this manifest no longer builds it" in out


def test_a_manifest_named_like_its_lock_is_refused(tmp_path):
    m = tiny_manifest(tmp_path)
    bad = m.with_suffix(".lock")
    m.rename(bad)
    code, out, err = cli("validate", str(bad))
    assert code == 2 and "may not end in .lock" in err
    assert bad.read_text().startswith("version: 1")


def test_validate_checks_the_files_the_manifest_names(tmp_path):
    m = tiny_manifest(tmp_path, weights="nope.pth")
    code, out, err = cli("validate", str(m))
    assert code == 2 and "nope.pth" in err and "not found" in err


def test_damaged_lock_entries_are_a_clear_error(built, tmp_path):
    root, _ = built
    copy = tmp_path / "d"
    shutil.copytree(root, copy)
    text = (copy / "m.lock").read_text()
    import yaml

    doc = yaml.safe_load(text)
    doc["stages"]["onnx.export"]["outputs"]["tiny.export.onnx"] = "oops"
    (copy / "m.lock").write_text(yaml.safe_dump(doc))
    for cmd in ("apply", "plan", "verify"):
        code, out, err = cli(cmd, str(copy / "m.yml"))
        assert code == 2 and "lock file is corrupt" in err and "outputs.tiny.export.onnx" in err, (cmd, err)
