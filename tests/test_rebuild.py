"""verify --rebuild: every stage rebuilt in a scratch folder and each artifact classified against the lock."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from reidbuild import featurefile, lockfile
from reidbuild.cli import main
from reidbuild.rebuild import first_difference
from tests.helpers import tiny_manifest


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: content hash and mtime (a rebuild must touch none)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("rebuild")
    m = tiny_manifest(root)
    code, _, err = cli("apply", str(m))
    assert code == 0, err
    return root, m


def verify_rebuild(m: Path) -> tuple[int, dict, str]:
    code, out, err = cli("verify", "--rebuild", "--json", str(m))
    return code, json.loads(out), err


def test_a_clean_build_is_reproduced_and_nothing_changes(built):
    root, m = built
    before = snapshot(root)
    code, rep, err = verify_rebuild(m)
    assert code == 0, err
    verdicts = {a["file"]: a["verdict"] for a in rep["artifacts"]}
    assert verdicts == {"tiny.fastreid.json": "identical", "tiny.export.onnx": "identical", "tiny.onnx": "identical",
                        "tiny.parity.onnxruntime.npz": "identical",
                        # the page records run times: not byte-reproducible, equivalent when its results are equal
                        "tiny.report.html": "equivalent"}
    assert rep["ok"] and rep["first_different_stage"] is None
    assert snapshot(root) == before


def test_a_faked_tool_version_is_different_and_names_the_stage(built):
    root, m = built
    lock_path = root / "m.lock"
    text = lock_path.read_text()
    lock = lockfile.read(lock_path)
    lock.stages["onnx.simplify"].tools["onnxsim"] = "0.0.1"
    lockfile.write(lock_path, lock)
    try:
        before = snapshot(root)
        code, rep, err = verify_rebuild(m)
        assert code == 1
        assert rep["first_different_stage"] == "onnx.simplify"
        bad = [a for a in rep["artifacts"] if a["verdict"] == "different"]
        assert [a["stage"] for a in bad] == ["onnx.simplify"]
        assert "onnxsim 0.0.1 in the lock" in bad[0]["detail"]
        assert "stage onnx.simplify is the first whose output differs" in err
        assert snapshot(root) == before
    finally:
        lock_path.write_text(text)


def test_a_functionally_different_artifact_is_different_with_the_tensor_named(built):
    """tiny.onnx replaced by a model with one weight scaled, and the lock updated to match: only a rebuild
    can tell that the locked bytes are not what the inputs build."""
    root, m = built
    lock_path, onnx_path = root / "m.lock", root / "out" / "tiny.onnx"
    text, original = lock_path.read_text(), onnx_path.read_bytes()
    model = onnx.load_from_string(original)
    init = model.graph.initializer[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    changed = model.SerializeToString()
    onnx_path.write_bytes(changed)
    lock = lockfile.read(lock_path)
    lock.stages["onnx.simplify"].outputs["tiny.onnx"]["sha256"] = hashlib.sha256(changed).hexdigest()
    lockfile.write(lock_path, lock)
    try:
        code, rep, _ = verify_rebuild(m)
        assert code == 1 and rep["first_different_stage"] == "onnx.simplify"
        first = next(a for a in rep["artifacts"] if a["verdict"] == "different")
        assert first["file"] == "tiny.onnx" and f"tensor {init.name} differs" in first["detail"]
    finally:
        onnx_path.write_bytes(original)
        lock_path.write_text(text)


def test_first_difference_names_the_array_and_index(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = a.copy()
    b[2, 1] += 1
    pa, pb = tmp_path / "a.npz", tmp_path / "b.npz"
    pa.write_bytes(featurefile.dumps({"x": a}))
    pb.write_bytes(featurefile.dumps({"x": b}))
    assert first_difference(pa, pb).startswith("array x: first difference at [2, 1]")
    assert featurefile.dumps({"x": a}) == pa.read_bytes()  # byte-reproducible
    ta, tb = tmp_path / "a.bin", tmp_path / "b.bin"
    ta.write_bytes(b"abcdef")
    tb.write_bytes(b"abcXef")
    assert first_difference(ta, tb) == "first differing byte at offset 3 (sizes 6 and 6)"


def test_verify_rebuild_without_a_lock_is_a_clear_error(tmp_path):
    m = tiny_manifest(tmp_path)
    code, _, err = cli("verify", "--rebuild", str(m))
    assert code == 1 and "no lock file" in err


def test_runner_equivalence_passes_a_same_model_and_names_a_changed_one(built, tmp_path):
    """The equivalence test a non-reproducible backend artifact (a TensorRT engine) gets, shown here with
    onnxruntime runners: same features -> equivalent; one weight scaled -> different, with the failures."""
    from reidbuild.manifest import load_manifest
    from reidbuild.rebuild import runner_equivalence
    from reidbuild.stages.assemble import assemble

    root, m = built
    lm = load_manifest(m)
    factory = assemble(lm).backends["onnxruntime"].factory
    images = sorted((root / "imgs").glob("*.png"))
    check = runner_equivalence(factory, images, lm.model.input, {"rtol": 1e-3, "atol": 1e-6, "min_cosine": 0.9999})
    same, changed = tmp_path / "same", tmp_path / "changed"
    same.mkdir()
    changed.mkdir()
    (same / "tiny.onnx").write_bytes((root / "out" / "tiny.onnx").read_bytes())
    model = onnx.load(root / "out" / "tiny.onnx")
    init = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, changed / "tiny.onnx")
    assert check(root / "out", same) is None
    why = check(root / "out", changed)
    assert why is not None and "outside rtol=0.001" in why
