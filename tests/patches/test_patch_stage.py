"""The patch stage with the pipeline: lock records, re-run on edit, failures write nothing; shipped patches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from reidbuild import lockfile
from reidbuild.caffe import schema as S
from reidbuild.errors import PatchError, StageFailed
from reidbuild.patches import apply_caffe, apply_onnx, diff_patches, load_patches
from reidbuild.pipeline import Stage, StageResult, run
from reidbuild.stages import ArtifactRef
from reidbuild.stages.patch import patch_stage
from tests.patches.util import (INPUT, caffe_forward, caffe_net, caffe_weights, images, reid_net, run_onnx,
                                write_patch)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "graph_patches"


def source_stage(name: str, files: dict[str, bytes]) -> Stage:
    return Stage(name, lambda ctx: StageResult(dict(files), {}), params={"v": 1}, outputs=tuple(files))


def run_all(tmp_path: Path, stages: list[Stage]):
    return run(stages, lock_path=tmp_path / "m.lock", manifest_entry={"path": "m.yml"}, output_dir=tmp_path / "out",
               base=tmp_path, emit=lambda e: None)


def onnx_stages(tmp_path: Path, onnx_bytes: bytes, patches: list[Path]) -> list[Stage]:
    src = source_stage("onnx.simplify", {"tiny.sim.onnx": onnx_bytes})
    st = patch_stage("onnx", patches, [ArtifactRef("onnx.simplify", "tiny.sim.onnx")], ["tiny.onnx"], "tiny",
                     dialect=None, check_input_shape=INPUT)
    return [src, st]


def test_editing_a_patch_reruns_only_the_patch_stage(tmp_path, onnx_bytes):
    p = write_patch(tmp_path, "patches/name.yml", """\
        format: onnx
        ops:
          - {op: rename_tensor, select: {last: true}, to: feat}
        """)
    st = onnx_stages(tmp_path, onnx_bytes, [p])
    assert st[1].name == "onnx.patch" and st[1].deps == ("onnx.simplify",)
    assert st[1].inputs == {"patch[0]": p}
    first = run_all(tmp_path, st)
    assert first.ran == ["onnx.simplify", "onnx.patch"]
    out = tmp_path / "out" / "tiny.onnx"
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["feat"]
    rec = lockfile.read(tmp_path / "m.lock").stages["onnx.patch"]
    assert rec.inputs["patch[0]"]["path"] == "patches/name.yml"
    assert rec.record["patches"][0]["ops"] == [{"op": "rename_tensor", "matched": 1}]
    assert rec.record["patches"][0]["file"] == "name.yml" and rec.record["input_layout"] == "float32_nchw"

    again = run_all(tmp_path, onnx_stages(tmp_path, onnx_bytes, [p]))
    assert again.ran == [] and again.cached == ["onnx.simplify", "onnx.patch"]

    p.write_text(p.read_text().replace("to: feat", "to: embedding"))
    edited = run_all(tmp_path, onnx_stages(tmp_path, onnx_bytes, [p]))
    assert edited.ran == ["onnx.patch"] and edited.cached == ["onnx.simplify"]
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["embedding"]


def test_a_breaking_patch_fails_the_stage_and_writes_nothing(tmp_path, onnx_bytes):
    p = write_patch(tmp_path, "ok.yml", "format: onnx\nops: [{op: rename_tensor, select: {last: true}, to: feat}]\n")
    run_all(tmp_path, onnx_stages(tmp_path, onnx_bytes, [p]))
    before = (tmp_path / "out" / "tiny.onnx").read_bytes()
    p.write_text("format: onnx\nops: [{op: remove_node, select: {type: Flatten}}]\n")
    with pytest.raises(StageFailed, match="ok.yml broke the graph"):
        run_all(tmp_path, onnx_stages(tmp_path, onnx_bytes, [p]))
    assert (tmp_path / "out" / "tiny.onnx").read_bytes() == before
    assert lockfile.read(tmp_path / "m.lock").stages["onnx.patch"].record["patches"][0]["ops"][0]["op"] == "rename_tensor"


def test_patch_files_are_validated_when_the_stage_is_built(tmp_path, onnx_bytes):
    bad = write_patch(tmp_path, "bad.yml", "format: onnx\nops:\n  - op: renam_node\n")
    with pytest.raises(PatchError, match=r"bad\.yml:3:5: ops\.0\.op: unknown op 'renam_node'"):
        onnx_stages(tmp_path, onnx_bytes, [bad])
    caffe = write_patch(tmp_path, "caffe.yml", "format: caffe\nops: [{op: rename_node, select: {type: A}, to: b}]\n")
    with pytest.raises(PatchError, match="listed under targets.onnx.patches"):
        onnx_stages(tmp_path, onnx_bytes, [caffe])


def test_patches_run_in_the_listed_order_in_the_stage(tmp_path, onnx_bytes):
    a = write_patch(tmp_path, "a.yml", "format: onnx\nops: [{op: rename_tensor, tensor: output, to: emb}]\n")
    b = write_patch(tmp_path, "b.yml", """\
        format: onnx
        changes_output: l2_normalize
        ops:
          - {op: l2_normalize_output}
          - {op: rename_tensor, tensor: emb, to: feat}
        """)
    st = onnx_stages(tmp_path, onnx_bytes, [a, b])
    assert st[1].params["output_transforms"] == ["l2_normalize"]
    run_all(tmp_path, st)
    m = onnx.load(str(tmp_path / "out" / "tiny.onnx"))
    assert [o.name for o in m.graph.output] == ["feat"]
    rec = lockfile.read(tmp_path / "m.lock").stages["onnx.patch"].record
    assert [p["role"] for p in rec["patches"]] == ["patch[0]", "patch[1]"]
    assert rec["output_transforms"] == ["l2_normalize"] and rec["patches"][1]["changes_output"] == "l2_normalize"


def test_caffe_patch_stage_rewrites_prototxt_and_weights(tmp_path):
    p = write_patch(tmp_path, "c.yml", """\
        format: caffe
        ops:
          - {op: rename_tensor, select: {last: true}, to: feat}
          - {op: rename_node, select: {name: fc}, to: head}
        """)
    w = caffe_weights("bvlc", 4 * 9 * 5)
    src = source_stage("caffe.convert", {"tiny.prototxt": caffe_net().encode(), "tiny.caffemodel": w})
    st = patch_stage("caffe", [p], [ArtifactRef("caffe.convert", "tiny.prototxt"),
                                    ArtifactRef("caffe.convert", "tiny.caffemodel")],
                     ["tiny.patched.prototxt", "tiny.patched.caffemodel"], "tiny", dialect="bvlc",
                     check_input_shape=(1, 3, 16, 8))
    assert st.name == "caffe.patch" and st.deps == ("caffe.convert",)
    out = run_all(tmp_path, [src, st])
    assert out.ran == ["caffe.convert", "caffe.patch"]
    net = S.parse_prototxt((tmp_path / "out" / "tiny.patched.prototxt").read_text(), "bvlc")
    model = S.parse_caffemodel((tmp_path / "out" / "tiny.patched.caffemodel").read_bytes(), "bvlc")
    assert net.layer[-1].top[0] == "feat" and [la.name for la in model.layer] == ["conv1", "head"]
    rec = lockfile.read(tmp_path / "m.lock").stages["caffe.patch"].record
    assert rec["dialect"] == "bvlc" and [o["matched"] for o in rec["patches"][0]["ops"]] == [1, 1]


# ------------------------------------------------------------------------------------ shipped patches


def shipped(*names: str) -> list[Path]:
    return [SHIPPED / n for n in names]


def test_every_shipped_patch_validates():
    files = sorted(SHIPPED.rglob("*.yml"))
    assert len(files) >= 7
    for lp in load_patches(files):
        assert lp.model.description, lp.path
    assert (SHIPPED / "README.md").is_file()


def test_shipped_onnx_patches_together(onnx_bytes):
    patches = load_patches(shipped("onnx/rename_output.yml", "onnx/l2_normalize.yml", "onnx/uint8_bgr_input.yml"),
                           "onnx")
    out, _ = apply_onnx(onnx_bytes, patches, input_shape=INPUT, what="m.onnx")
    m = onnx.load_from_string(out)
    assert [o.name for o in m.graph.output] == ["feat"]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    from reidbuild.patches import adapt_input, apply_output_transform, input_layout, output_transforms

    x = images(2)
    ref = run_onnx(onnx_bytes, x)
    for t in output_transforms(patches):
        ref = apply_output_transform(t, ref)
    got = run_onnx(out, adapt_input(input_layout(patches), x))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dialect", ["bvlc", "ceil_mode"])
def test_shipped_caffe_patches_on_a_reidbuild_style_net(tmp_path, dialect):
    """The old manual steps on a net shaped like reidbuild's output: which are no-ops, and that none of
    them changes the numbers (checked through real Caffe when it is installed)."""
    net, weights = reid_net(dialect)
    files = shipped("caffe/strip_ceil_mode.yml", "caffe/add_global_avg_pool.yml",
                    "caffe/rename_last_top_to_output.yml")
    text, new_w, rec = apply_caffe(net, weights, load_patches(files, "caffe"), dialect=dialect,
                                   input_shape=(1, 3, 16, 8), what="net")
    matched = [r["ops"][0]["matched"] for r in rec]
    # strip_ceil_mode converts only a ceil_mode net (its stem max-pool rounds down, and rounding up would
    # add a row and a column); the net ends in its pooling/BN head, so add_global_avg_pool matches nothing;
    # the last top already is "output"
    assert matched == [1 if dialect == "ceil_mode" else 0, 0, 1]
    assert "global_avg_pool" not in text and "ceil_mode" not in text
    if dialect == "bvlc":
        assert text == S.net_to_text(S.parse_prototxt(net, "bvlc"))  # nothing changed at all
    parsed = S.parse_prototxt(text, "bvlc")
    assert parsed.layer[-1].top[0] == "output"
    rename = shipped("caffe/rename_output.yml")
    text2, _, _ = apply_caffe(text, None, load_patches(rename), dialect=dialect, input_shape=None, what="net")
    assert S.parse_prototxt(text2, dialect).layer[-1].top[0] == "feat"
    if dialect == "ceil_mode":
        for name, t, w in (("a", net, weights), ("b", text, new_w)):
            (tmp_path / f"{name}.prototxt").write_text(t)
            (tmp_path / f"{name}.caffemodel").write_bytes(w)
        x = images(1)
        a = caffe_forward(tmp_path / "a.prototxt", tmp_path / "a.caffemodel", x)
        b = caffe_forward(tmp_path / "b.prototxt", tmp_path / "b.caffemodel", x)
        np.testing.assert_allclose(a["output"], b["output"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dialect", ["bvlc", "ceil_mode"])
def test_shipped_caffe_patches_on_the_converters_output(tmp_path, onnx_bytes, dialect):
    """The old manual steps on what reidbuild.caffe.convert writes: no-ops except where the README says."""
    from reidbuild.caffe.convert import convert

    text, weights = convert(onnx.load_from_string(onnx_bytes), dialect, INPUT, name="tiny")
    files = shipped("caffe/strip_ceil_mode.yml", "caffe/add_global_avg_pool.yml",
                    "caffe/rename_last_top_to_output.yml", "caffe/rename_output.yml")
    new_text, new_w, rec = apply_caffe(text, weights, load_patches(files, "caffe"), dialect=dialect,
                                       input_shape=INPUT, what="tiny.prototxt")
    # only a ceil_mode net has floor pooling to convert; the head's pooling is already there; the last top
    # already is "output"
    assert [r["ops"][0]["matched"] for r in rec] == [1 if dialect == "ceil_mode" else 0, 0, 1, 1]
    assert S.parse_prototxt(new_text, "bvlc").layer[-1].top[0] == "feat"
    x = images(1)
    (tmp_path / "p.prototxt").write_text(new_text)
    (tmp_path / "p.caffemodel").write_bytes(new_w)
    got = caffe_forward(tmp_path / "p.prototxt", tmp_path / "p.caffemodel", x)["feat"]
    np.testing.assert_allclose(got.reshape(1, -1), run_onnx(onnx_bytes, x), rtol=1e-4, atol=1e-5)


def test_add_global_avg_pool_applies_to_a_bare_backbone(tmp_path):
    net = caffe_net().split('layer { name: "pool1"')[0]  # ends with relu1 in place on conv1
    text, _, rec = apply_caffe(net, None, load_patches(shipped("caffe/add_global_avg_pool.yml")), dialect="bvlc",
                               input_shape=None, what="net")
    parsed = S.parse_prototxt(text, "bvlc")
    assert parsed.layer[-1].name == "global_avg_pool" and list(parsed.layer[-1].bottom) == ["conv1"]
    assert rec[0]["ops"][0]["matched"] == 1


def test_plan_diff_for_shipped_patches(tmp_path, onnx_file):
    diffs = diff_patches("onnx", shipped("onnx/rename_output.yml", "onnx/uint8_bgr_input.yml"), [onnx_file])
    assert "+input  input: uint8[batch,16,8,3]" in diffs[1][1]
