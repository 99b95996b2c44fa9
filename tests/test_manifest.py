"""Manifest validation: the README's example validates; every kind of mistake gives file:line:col + field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reidbuild.errors import ManifestError
from reidbuild.manifest import json_schema, load_manifest

from tests.helpers import write

EXAMPLE = Path(__file__).resolve().parent.parent / "manifests" / "market1501_bagtricks_R50.yml"


def test_issue_example_validates_as_written():
    lm = load_manifest(EXAMPLE)
    m = lm.model
    assert m.name == "baseline_R50"
    assert m.source.opts == {"MODEL.HEADS.POOL_LAYER": "GlobalAvgPool"}
    assert m.targets.tensorrt.mode == "fp16" and m.targets.tensorrt.batch_size == 8
    assert m.targets.caffe.dialect == "ceil_mode"
    assert m.parity.backends == ["onnxruntime", "caffe", "tensorrt"]
    assert lm.output_dir == (EXAMPLE.parent / "../outputs/baseline_R50").resolve()
    assert lm.lock_path.name == "market1501_bagtricks_R50.lock"


def _bad(tmp_path: Path, text: str) -> str:
    p = write(tmp_path / "m.yml", text)
    with pytest.raises(ManifestError) as ei:
        load_manifest(p)
    assert "\n" not in str(ei.value)
    return str(ei.value)


BASE = """\
version: 1
name: x
source:
  format: fastreid
  config: c.yml
  weights: {random: {seed: 0}}
input:
  height: 64
  width: 32
output_dir: out
"""


def test_unknown_key_did_you_mean(tmp_path):
    msg = _bad(tmp_path, BASE + "targets:\n  onnx:\n    simplfy: true\n")
    assert msg.endswith("m.yml:13:5: targets.onnx.simplfy: unknown key (did you mean 'simplify'?)"), msg


def test_wrong_type_names_field_and_line(tmp_path):
    msg = _bad(tmp_path, BASE.replace("height: 64", "height: tall"))
    assert ":8:" in msg and "input.height" in msg and "integer" in msg


def test_missing_key(tmp_path):
    msg = _bad(tmp_path, BASE.replace("output_dir: out\n", ""))
    assert "output_dir" in msg and "required" in msg


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", ".hidden", "x..y"])
def test_name_must_be_plain_file_name(tmp_path, name):
    msg = _bad(tmp_path, BASE.replace("name: x", f"name: '{name}'"))
    assert "name" in msg and "plain file name" in msg and ":2:" in msg


def test_int8_needs_calibration(tmp_path):
    msg = _bad(tmp_path, BASE + "targets:\n  tensorrt:\n    mode: int8\n    batch_size: 4\n"
               "parity:\n  images: '*.png'\n  backends: [onnxruntime]\n")
    assert "calibration" in msg and "targets.tensorrt" in msg


def test_tensorrt_size_must_agree_with_input(tmp_path):
    msg = _bad(tmp_path, BASE + "targets:\n  tensorrt:\n    mode: fp32\n    batch_size: 4\n    height: 256\n")
    assert "targets.tensorrt.height is 256 but input.height is 64" in msg


def test_parity_backends_must_be_declared_targets(tmp_path):
    msg = _bad(tmp_path, BASE + "parity:\n  images: '*.png'\n  backends: [onnxruntime, caffe]\n")
    assert "['caffe'] are not declared under targets" in msg


def test_unknown_backend_and_dialect(tmp_path):
    msg = _bad(tmp_path, BASE + "targets:\n  caffe:\n    dialect: round_mode\n")
    assert "targets.caffe.dialect" in msg and "'round_mode'" in msg and ":13:" in msg


def test_dialect_is_never_guessed(tmp_path):
    msg = _bad(tmp_path, BASE + "targets:\n  caffe: {}\n")
    assert "targets.caffe.dialect" in msg and "required" in msg


def test_duplicate_key_and_bad_yaml(tmp_path):
    assert "duplicate key 'name'" in _bad(tmp_path, BASE + "name: y\n")
    assert "invalid YAML" in _bad(tmp_path, BASE + "targets: [\n")


def test_yaml_bomb_is_refused(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    prev = "a"
    for i in range(8):
        bomb += f"b{i}: &b{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        prev = f"b{i}"
    assert "alias bomb" in _bad(tmp_path, bomb)


def test_non_utf8_and_huge(tmp_path):
    p = tmp_path / "m.yml"
    p.write_bytes(BASE.encode() + b"# \xff\xfe\n")
    with pytest.raises(ManifestError, match="not valid UTF-8"):
        load_manifest(p)
    p.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ManifestError, match="at most"):
        load_manifest(p)


def test_not_a_mapping_and_missing_file(tmp_path):
    assert "must be a mapping" in _bad(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.yml")


def test_json_schema_lists_every_section():
    schema = json.loads(json_schema())
    assert set(schema["properties"]) == {"version", "name", "source", "input", "output_dir", "targets", "parity"}
    assert "CaffeTarget" in schema["$defs"] and schema["$defs"]["CaffeTarget"]["additionalProperties"] is False
