"""Manifest, config, patch and image inputs through the CLI: hostile or broken input is refused with exit 2 and
one clear line (no traceback, nothing written, quickly), odd-but-valid images just work."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, tiny_manifest
from tests.reliability._util import assert_one_line_error, cli, count, floor, sha

BOMB = "".join(
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]\n"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)]
)


def _valid(root: Path) -> str:
    return tiny_manifest(root).read_text()


def _replace(old: str, new: str):
    return lambda root: _valid(root).replace(old, new)


def _deep_block(root: Path) -> str:
    return _valid(root) + "extra:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(300)) + "  " * 301 + "v\n"


MANIFESTS = {
    # (text or bytes builder, needle in the one error line)
    "alias bomb (billion laughs)": (lambda r: _valid(r) + BOMB, "alias bomb"),
    "recursive alias": (lambda r: _valid(r) + "loop: &x [*x]\n", "nesting"),
    "deep flow nesting": (lambda r: "[" * 5000 + "]" * 5000 + "\n", "nesting"),
    "deep block nesting": (_deep_block, "nesting"),
    "huge file": (lambda r: _valid(r) + ("# padding padding padding padding\n" * 40_000), "at most"),
    "non-UTF-8 (latin-1)": (lambda r: _valid(r).replace("name: tiny", "name: caf\xe9").encode("latin-1"), "UTF-8"),
    "UTF-16": (lambda r: _valid(r).encode("utf-16"), "UTF-8"),
    "NUL byte": (lambda r: _valid(r).replace("name: tiny", "name: ti\x00ny"), "invalid YAML"),
    "binary garbage": (lambda r: bytes(range(256)) * 8, "UTF-8"),
    "empty file": (lambda r: "", "must be a mapping"),
    "only a comment": (lambda r: "# nothing\n", "must be a mapping"),
    "top level is a list": (lambda r: "- version: 1\n", "must be a mapping"),
    "top level is a scalar": (lambda r: "hello\n", "must be a mapping"),
    "duplicate key": (lambda r: _valid(r) + "name: other\n", "duplicate key 'name'"),
    "duplicate nested key": (_replace("  height: 64\n", "  height: 64\n  height: 65\n"), "duplicate key 'height'"),
    "merge key": (lambda r: _valid(r).replace("input:\n", "base: &b {height: 64}\ninput:\n  <<: *b\n"), "merge"),
    "unknown key with suggestion": (_replace("  width: 32\n", "  width: 32\n  interpolaton: bicubic\n"),
                                    "did you mean 'interpolation'"),
    "non-string key": (lambda r: _valid(r) + "1: one\n", "1"),
    "key with a line break": (lambda r: _valid(r).replace("  width: 32\n", '  width: 32\n  "a\\nb": 1\n'),
                              "input.'a\\nb': unknown key"),
    "complex key": (lambda r: _valid(r) + "? [a, b]\n: c\n", "plain scalars"),
    "wrong type: height string": (_replace("height: 64", "height: tall"), "input.height"),
    "wrong type: height float": (_replace("height: 64", "height: 64.5"), "input.height"),
    "wrong type: huge number": (_replace("height: 64", "height: 1e400"), "input.height"),
    "wrong type: name int": (_replace("name: tiny", "name: 123"), "name"),
    "wrong type: name null": (_replace("name: tiny", "name: null"), "name"),
    "wrong type: version": (_replace("version: 1", "version: '1'"), "version"),
    "wrong type: backends string": (_replace("backends: [onnxruntime]", "backends: onnxruntime"), "parity.backends"),
    "wrong type: source list": (lambda r: _valid(r).replace("source:\n", "source: [1, 2]\nxsource:\n"), "source"),
    "wrong type: seed negative": (_replace("seed: 1", "seed: -1"), "source.weights.random.seed"),
    "wrong type: seed bool": (_replace("seed: 1", "seed: true"), "source.weights.random.seed"),
    "wrong type: height yes": (_replace("height: 64", "height: yes"), "input.height"),
    "missing key": (_replace("output_dir: out\n", ""), "output_dir: required key is missing"),
    "undeclared parity backend": (_replace("backends: [onnxruntime]", "backends: [caffe]"), "not declared"),
    "python object tag": (_replace("name: tiny", "name: !!python/object/apply:os.system ['touch PWNED']"), "name"),
    "python scalar tag": (_replace("name: tiny", "name: !!python/name:os.system"), "cannot read value"),
    "unknown tag": (_replace("name: tiny", "name: !custom tiny"), "cannot read value"),
    "invalid YAML": (_replace("backends: [onnxruntime]", "backends: [onnxruntime"), "invalid YAML"),
    "tab indentation": (_replace("  height: 64", "\theight: 64"), "invalid YAML"),
    "glob matches nothing": (_replace("images: imgs/*.png", "images: nothing/*.png"), "matches no file"),
    "glob matches only folders": (_replace("images: imgs/*.png", "images: cfg"), "matches no file"),
    "config missing": (_replace("cfg/config.yml", "cfg/missing.yml"), "missing.yml"),
    "config is a folder": (_replace("cfg/config.yml", "cfg"), "cfg"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_bad_manifest_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    make, needle = MANIFESTS[case]
    root = tmp_path / "proj"
    m = tiny_manifest(root)  # config and images exist: only the manifest is bad
    content = make(root)
    m.write_bytes(content if isinstance(content, bytes) else content.encode())
    t0 = time.perf_counter()
    for command in ("validate", "apply"):
        code, out, err = cli(command, m)
        assert_one_line_error(code, err, 2, needle)
    assert time.perf_counter() - t0 < 20, "refusing took too long"
    assert not (root / "out").exists() and not (root / "m.lock").exists()
    assert not (root / "PWNED").exists() and not (REPO / "PWNED").exists()
    count("inputs: bad manifests refused")


CONFIGS = {
    "config alias bomb": ("MODEL:\n  META_ARCHITECTURE: Baseline\n" + BOMB, "config.yml"),
    "config deep nesting": ("[" * 5000 + "]" * 5000, "config.yml"),
    "config non-UTF-8": ("MODEL:\n  META_ARCHITECTURE: Basel\xefne\n".encode("latin-1"), "config.yml"),
    "config unsupported backbone": ("MODEL:\n  BACKBONE:\n    NAME: build_osnet_backbone\n", "build_osnet_backbone"),
    "config _BASE_ cycle": ("_BASE_: config.yml\n", "config.yml"),
    "config _BASE_ missing": ("_BASE_: nowhere.yml\n", "nowhere.yml"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_is_one_line_exit_2(tmp_path, case):
    text, needle = CONFIGS[case]
    m = tiny_manifest(tmp_path)
    cfg = tmp_path / "cfg" / "config.yml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, out, err = cli("apply", m)
    assert_one_line_error(code, err, 2, needle)
    assert not (tmp_path / "m.lock").exists()
    count("inputs: bad configs refused")


PATCHES = {
    "patch alias bomb": ("format: onnx\nops:\n  - op: strip_metadata\n" + BOMB, "alias bomb"),
    "patch deep nesting": ("[" * 5000 + "]" * 5000, "nesting"),
    "patch non-UTF-8": ("format: onnx\ndescription: caf\xe9\nops: []\n".encode("latin-1"), "UTF-8"),
    "patch duplicate key": ("format: onnx\nformat: onnx\nops: []\n", "duplicate key"),
    "patch unknown op": ("format: onnx\nops:\n  - op: rename_tensr\n    tensor: a\n    to: b\n", "rename_tensor"),
    "patch wrong type": ("format: onnx\nops: {op: strip_metadata}\n", "ops"),
    "patch empty": ("", "must be a mapping"),
    "patch huge": ("format: onnx\nops: []\n" + "#" * (2 << 20), "at most"),
}


@pytest.mark.parametrize("case", list(PATCHES))
def test_bad_patch_file_is_one_line_exit_2(tmp_path, case):
    text, needle = PATCHES[case]
    m = tiny_manifest(tmp_path)
    m.write_text(m.read_text() + "targets:\n  onnx:\n    patches: [p.yml]\n")
    (tmp_path / "p.yml").write_bytes(text if isinstance(text, bytes) else text.encode())
    code, out, err = cli("validate", m)
    line = assert_one_line_error(code, err, 2, needle)
    assert "p.yml" in line
    count("inputs: bad patch files refused")


# ----------------------------------------------------------------------------------------------- images

def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def _bad_truncated(d: Path) -> None:
    data = (REPO / "test_data" / "p03_rgb.png").read_bytes()
    (d / "trunc.png").write_bytes(data[: len(data) // 3])


def _bad_header_only(d: Path) -> None:
    (d / "header.png").write_bytes(b"\x89PNG\r\n\x1a\n")


def _bad_zero(d: Path) -> None:
    (d / "zero.png").write_bytes(b"")


def _bad_text(d: Path) -> None:
    (d / "text.png").write_text("this is not an image\n")


def _bad_jpeg_garbage(d: Path) -> None:
    data = bytearray((REPO / "test_data" / "p00_rgb.jpg").read_bytes())
    for i in range(200, len(data) - 2, 7):
        data[i] = 0xFF
    (d / "garbled.jpg").write_bytes(bytes(data[:400]))


def _bad_bomb(d: Path) -> None:
    from PIL import Image

    Image.new("1", (9000, 9000)).save(d / "bomb.png")


BAD_IMAGES = {"truncated PNG": (_bad_truncated, "trunc.png"), "PNG signature only": (_bad_header_only, "header.png"),
              "zero-sized": (_bad_zero, "zero.png"), "text named .png": (_bad_text, "text.png"),
              "garbled JPEG": (_bad_jpeg_garbage, "garbled.jpg"), "decompression bomb": (_bad_bomb, "bomb.png")}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_is_one_line_exit_2_naming_the_file(project, case):
    make, fname = BAD_IMAGES[case]
    imgs = project.root / "imgs"
    make(imgs)
    m = project.manifest
    m.write_text(m.read_text().replace("imgs/*.png", "imgs/*"))
    lock_before = (project.root / "m.lock").read_bytes()
    code, out, err = cli("apply", m)
    assert_one_line_error(code, err, 2, fname)
    assert (project.root / "m.lock").read_bytes() == lock_before
    count("inputs: bad images refused")


def _odd_images(d: Path) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(5)
    made = []
    _png(d / "one_by_one.png", np.array([[[200, 10, 30]]], np.uint8)); made.append("one_by_one.png")
    g16 = (rng.random((40, 20)) * 65535).astype(np.uint16)
    Image.fromarray(g16).save(d / "grey16.png"); made.append("grey16.png")
    assert Image.open(d / "grey16.png").mode.startswith("I")
    Image.open(REPO / "test_data" / "p00_rgb.jpg").convert("CMYK").save(d / "cmyk.jpg"); made.append("cmyk.jpg")
    assert Image.open(d / "cmyk.jpg").mode == "CMYK"
    frames = [Image.fromarray((rng.random((64, 32, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    made.append("anim.gif")
    frames[0].save(d / "anim.png", save_all=True, append_images=frames[1:], duration=50)
    made.append("anim.png")
    assert getattr(Image.open(d / "anim.png"), "n_frames", 1) == 3
    Image.fromarray((rng.random((30, 15)) * 255).astype(np.uint8)).convert("LA").save(d / "grey_alpha.png")
    made.append("grey_alpha.png")
    Image.new("1", (16, 48), 1).save(d / "bilevel.png"); made.append("bilevel.png")
    Image.open(REPO / "test_data" / "p03_rgb.png").convert("RGB").resize((1000, 2)).save(d / "sliver.png")
    made.append("sliver.png")
    Image.fromarray(rng.random((50, 25)).astype(np.float32) * 255, "F").save(d / "float.tiff"); made.append("float.tiff")
    im = Image.open(REPO / "test_data" / "p00_rgb.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: EXIF orientation applied
    im.save(d / "rotated.jpg", exif=exif); made.append("rotated.jpg")
    shutil.copy(REPO / "test_data" / "p07_palette.png", d / "palette.png"); made.append("palette.png")
    shutil.copy(REPO / "test_data" / "p06_alpha.png", d / "alpha.png"); made.append("alpha.png")
    return made


def test_odd_but_valid_images_just_work(project):
    imgs = project.root / "imgs"
    made = _odd_images(imgs)
    assert len(made) >= floor("odd valid images accepted"), made
    m = project.manifest
    m.write_text(m.read_text().replace("imgs/*.png", "imgs/*"))
    code, out, err = cli("apply", m)
    assert code == 0, err
    assert "parity.onnxruntime: running" in err and "load: up to date" in err
    from reidbuild import lockfile

    par = lockfile.read(project.root / "m.lock").stages["parity.onnxruntime"]
    assert par.status == "ok" and par.record["passed"]
    assert set(made) <= {r["image"] for r in par.record["per_image"]}
    same = [n for n in project.artifacts if ".parity." not in n]  # the parity features now cover more images
    assert {n: sha(project.out / n) for n in same} == {n: project.artifacts[n] for n in same}
    count("inputs: odd valid images accepted", len(made))
