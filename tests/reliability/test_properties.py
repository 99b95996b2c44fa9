"""Property-based: whatever a manifest or patch file contains, the loader ends in success or a ReidbuildError
subclass with a one-line message naming the file - never another exception, never a traceback."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reidbuild.errors import ReidbuildError
from reidbuild.patches.spec import load_patch
from tests.helpers import REPO, tiny_manifest
from tests.reliability._util import count

EXAMPLES = 300
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                   HealthCheck.data_too_large])

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | _text | st.sampled_from(
    ["onnxruntime", "caffe", "tensorrt", "fp16", "int8", "bvlc", "ceil_mode", "RGB", "bicubic", "*.png", "..",
     "/etc/passwd", "a/b", "", "~", "null", "1e-3", "0x10", "yes", "onnx"])
_keys = _text | st.integers(-5, 5) | st.sampled_from(
    ["version", "name", "source", "input", "output_dir", "targets", "parity", "onnx", "caffe", "tensorrt",
     "format", "config", "weights", "random", "seed", "opts", "height", "width", "images", "backends", "ops",
     "op", "select", "to", "tensor", "node", "last", "optional", "changes_output", "changes_input", "mode"])
_trees = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(_keys, kids, max_size=5),
                      max_leaves=40)


def _paths(tree: Any, at: tuple = ()) -> list[tuple]:
    out = [at]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, at + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, at + (i,))
    return out


def _get(tree: Any, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


@st.composite
def _mutated(draw, base: Any) -> Any:
    """A valid document with 1-4 random edits: deleted keys, wrong types, random strings, random nesting."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["delete", "replace", "scalar", "wrap_list", "wrap_dict", "add_key",
                                     "rename_key", "stringify", "number", "duplicate_subtree"]))
        if not path:
            if kind in ("replace", "scalar"):
                doc = draw(_trees if kind == "replace" else _scalars)
            elif kind == "wrap_list":
                doc = [doc]
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        value = parent[key]
        if kind == "delete":
            del parent[key]
        elif kind == "replace":
            parent[key] = draw(_trees)
        elif kind == "scalar":
            parent[key] = draw(_scalars)
        elif kind == "wrap_list":
            parent[key] = [value]
        elif kind == "wrap_dict":
            parent[key] = {draw(_keys): value}
        elif kind == "add_key" and isinstance(value, dict):
            value[draw(_keys)] = draw(_trees)
        elif kind == "rename_key" and isinstance(parent, dict):
            parent[draw(_keys)] = parent.pop(key)
        elif kind == "stringify":
            parent[key] = str(value)
        elif kind == "number":
            parent[key] = draw(st.integers(-10, 10**6) | st.floats(-1e9, 1e9))
        elif kind == "duplicate_subtree":
            parent[key] = copy.deepcopy(draw(st.sampled_from([_get(doc, p) for p in paths])))
    return doc


@st.composite
def _byte_edits(draw, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(st.binary(min_size=1, max_size=4) | st.integers(90, 3000).map(lambda n: b"[" * n) | st.sampled_from(
            [b"&a ", b"*a", b"<<: ", b"\t", b"\n  ", b"{", b"[", b"]", b"}", b": ", b"- ", b"!!python/name:os.system ",
             b"\xff", b"\xc3", b"\x00", b"'", b'"', b"#", b"%YAML 1.1\n", b"---\n", b"...\n", b"? ", b"|\n"]))
        if kind == "insert":
            data[i:i] = chunk
        elif kind == "delete":
            del data[i:i + len(chunk)]
        else:
            data[i:i + len(chunk)] = chunk
    return bytes(data)


def _dump(tree: Any) -> bytes:
    return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False).encode("utf-8")


def _check(load, path: Path, data: bytes) -> bool:
    """Loads ``data``; True if accepted. Anything but success or a one-line ReidbuildError fails the test."""
    path.write_bytes(data)
    try:
        load(path)
        return True
    except ReidbuildError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        assert msg.startswith(str(path)), msg  # names the file (and mostly line:column)
        return False


# ------------------------------------------------------------------------------------------------ manifests

@pytest.fixture(scope="module")
def manifest_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop_manifest")
    m = tiny_manifest(root)
    base = yaml.safe_load(m.read_text())
    base["targets"] = {"onnx": {"opset": 17, "patches": []}, "caffe": {"dialect": "bvlc"},
                       "tensorrt": {"mode": "fp16", "batch_size": 4}}
    base["parity"]["overrides"] = {"caffe": {"atol": 0.001, "min_cosine": 0.999}}
    base["parity"]["backends"] = ["onnxruntime", "caffe"]
    base["source"]["opts"] = {"MODEL.HEADS.POOL_LAYER": "GlobalAvgPool"}
    from reidbuild.manifest import load_manifest

    m.write_bytes(_dump(base))
    load_manifest(m)  # the starting point is valid
    return root / "h.yml", base


def _run(name: str, load, path: Path, data_strategy) -> None:
    seen = {"ok": 0, "refused": 0}

    @SETTINGS
    @given(data_strategy)
    def prop(data: bytes) -> None:
        seen["ok" if _check(load, path, data) else "refused"] += 1

    prop()
    total = seen["ok"] + seen["refused"]
    print(f"\n{name}: {total} examples ({seen['ok']} accepted, {seen['refused']} refused)")
    count(f"property examples: {name}", total)
    assert total >= EXAMPLES * 0.9 and seen["refused"] > 0


def test_random_yaml_trees_as_manifests(manifest_base):
    from reidbuild.manifest import load_manifest

    path, _ = manifest_base
    _run("manifest, random YAML trees", load_manifest, path, _trees.map(_dump))


def test_mutated_valid_manifests(manifest_base):
    from reidbuild.manifest import load_manifest

    path, base = manifest_base
    _run("manifest, mutated valid manifests", load_manifest, path, _mutated(base).map(_dump))


def test_byte_edited_valid_manifests(manifest_base):
    from reidbuild.manifest import load_manifest

    path, base = manifest_base
    _run("manifest, byte-edited valid manifests", load_manifest, path, _byte_edits(_dump(base)))


# -------------------------------------------------------------------------------------------------- patches

@pytest.fixture(scope="module")
def patch_bases(tmp_path_factory):
    files = sorted((REPO / "graph_patches").rglob("*.yml"))
    assert len(files) >= 5, f"the ready-made patch files are the starting points: {files}"
    bases = [yaml.safe_load(p.read_text()) for p in files]
    for p in files:
        load_patch(p)  # the starting points are valid
    return tmp_path_factory.mktemp("prop_patch") / "p.yml", bases


def test_random_yaml_trees_as_patches(patch_bases):
    path, _ = patch_bases
    _run("patch, random YAML trees", load_patch, path, _trees.map(_dump))


def test_mutated_valid_patches(patch_bases):
    path, bases = patch_bases
    _run("patch, mutated valid patches", load_patch, path,
         st.sampled_from(bases).flatmap(_mutated).map(_dump))


def test_byte_edited_valid_patches(patch_bases):
    path, bases = patch_bases
    _run("patch, byte-edited valid patches", load_patch, path,
         st.sampled_from([_dump(b) for b in bases]).flatmap(_byte_edits))
