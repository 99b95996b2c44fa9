"""Graph patches through the real CLI: parity follows declared output/input changes; plan --diff shows them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner

from reidbuild import lockfile
from reidbuild.cli import main
from tests.helpers import tiny_manifest

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def with_onnx_patches(root: Path, *names: str) -> Path:
    m = tiny_manifest(root)
    patches = ", ".join(str(REPO / "graph_patches" / "onnx" / n) for n in names)
    m.write_text(m.read_text() + f"targets:\n  onnx:\n    patches: [{patches}]\n")
    return m


def test_l2_and_uint8_patches_pass_parity_against_transformed_reference(tmp_path):
    m = with_onnx_patches(tmp_path, "uint8_bgr_input.yml", "l2_normalize.yml")
    code, out, err = cli("apply", str(m))
    assert code == 0, err
    model = onnx.load(tmp_path / "out" / "tiny.onnx")
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    rec = lockfile.read(tmp_path / "m.lock").stages["parity.onnxruntime"]
    assert rec.status == "ok" and rec.record["transforms"] == ["l2_normalize"]
    # the features really are unit length: the reference was normalised too, not the tolerance loosened
    code, _, err = cli("infer", str(m), "--backend", "onnxruntime", "--input", str(tmp_path / "imgs" / "*.png"),
                       "--output", str(tmp_path / "f"))
    assert code == 0, err
    # infer feeds the graph through the same adapter as parity
    for f in (tmp_path / "f").glob("*.npy"):
        assert abs(float(np.linalg.norm(np.load(f))) - 1.0) < 1e-4


def test_plan_diff_shows_each_patch(tmp_path):
    m = with_onnx_patches(tmp_path, "rename_output.yml", "l2_normalize.yml")
    assert cli("apply", str(m))[0] == 0
    code, out, err = cli("plan", "--diff", str(m))
    assert code == 0, err
    assert "### onnx.patch:" in out and "rename_output.yml" in out and "l2_normalize.yml" in out
    assert "+" in out and "feat" in out
    code, out, _ = cli("plan", "--json", "--diff", str(m))
    assert len(json.loads(out)["diffs"]) == 2


def test_editing_a_patch_reruns_only_the_stages_after_it(tmp_path):
    patch = tmp_path / "p.yml"
    patch.write_text("format: onnx\nops:\n  - op: rename_tensor\n    select: {last: true}\n    to: feat\n")
    m = tiny_manifest(tmp_path)
    m.write_text(m.read_text() + f"targets:\n  onnx:\n    patches: [{patch}]\n")
    assert cli("apply", str(m))[0] == 0
    patch.write_text(patch.read_text().replace("feat", "embedding"))
    code, out, err = cli("apply", str(m))
    assert code == 0, err
    assert "onnx.simplify: up to date" in err and "onnx.patch: running" in err and "parity.onnxruntime: running" in err
    assert onnx.load(tmp_path / "out" / "tiny.onnx").graph.output[0].name == "embedding"


def test_patch_matching_nothing_is_exit_2_naming_file_and_op(tmp_path):
    patch = tmp_path / "p.yml"
    patch.write_text("format: onnx\nops:\n  - op: remove_node\n    select: {name: no_such_node}\n")
    m = tiny_manifest(tmp_path)
    m.write_text(m.read_text() + f"targets:\n  onnx:\n    patches: [{patch}]\n")
    code, out, err = cli("apply", str(m))
    assert code == 2 and "p.yml" in err and "no_such_node" in err


def test_int8_calibration_and_parity_feed_a_uint8_patched_graph(tmp_path):
    m = tiny_manifest(tmp_path)
    patch = REPO / "graph_patches" / "onnx" / "uint8_bgr_input.yml"
    m.write_text(m.read_text() + f"""targets:
  onnx:
    patches: [{patch}]
  tensorrt:
    mode: int8
    batch_size: 2
    calibration:
      images: imgs/*.png
      batches: 2
""")
    code, out, err = cli("apply", "--skip-unavailable", str(m))
    assert code == 0, err
    lock = lockfile.read(tmp_path / "m.lock")
    int8 = onnx.load(tmp_path / "out" / "tiny.int8.onnx")
    assert int8.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    rec = lock.stages["parity.onnx_int8"]
    assert rec.status == "ok" and rec.record["min_cosine"] >= 0.99, rec.record
    assert lock.stages["tensorrt.engine"].status == "skipped"
