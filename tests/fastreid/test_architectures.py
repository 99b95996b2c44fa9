"""Every architecture family in fast-reid's shipped configs, proven against fast-reid's own code.

For each family the reference is the model fast-reid 1.4's ``build_model`` makes from the same resolved
config (the installed ``fastreid`` package), with trained-like weights (seeded, BN statistics measured on
person-like images) saved as fast-reid's Checkpointer saves them. reidbuild's built-in model must have
fast-reid's state-dict keys and shapes (training-only classifier keys aside), load that checkpoint, and
give fast-reid's eval output; its ONNX export must agree on onnxruntime, and its Caffe conversion on
pycaffe and OpenCV (or, for the ViT, be refused with one line).

Families (configs written here in our own words, with the settings fast-reid's configs resolve to):
ResNeSt (bagtricks/AGW/SBS _S50: split attention, deep stem, avd, avg-pool downsampling), MGN
(mgn_R50-ibn: 8 heads over 3 branches, stripes cut from the part maps), ViT (bagtricks_vit) and the vehicle
configs (R50-ibn + non-local + GeM-P at a square input). Inputs are small so the suite stays fast; the
43-config matrix at the configured sizes is the corpus tests' job.

Tolerance: every comparison is relative to the features' scale. fast-reid's own float32 forward differs
from its float64 forward by up to ~1.5e-4 of the largest |feature| on these trained-like ResNeSt/MGN
models (measured), and onnxruntime/Caffe/OpenCV differ from PyTorch by the same order, so the bound is
1e-3 of the largest |feature| plus a cosine of at least 1 - 1e-6; a structural error (a wrong softmax axis,
a missing avd pool, swapped stripes) moves features by tens of percent.
"""
from __future__ import annotations

import functools
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from reidbuild.errors import ConfigError, NotExpressible
from reidbuild.fastreid import build_model, load_config, load_weights
from reidbuild.fastreid.catalog import BACKBONES, RESNEST_DEPTHS, UNSUPPORTED_BACKBONES
from reidbuild.fastreid.checkpoint import is_training_only
from reidbuild.testing import feature_cosines, person_like_images
from tests.caffe._util import DIALECTS, RUNTIMES, export, need, run_caffe, write_caffe
from tests.fastreid.reference import (
    eval_features,
    fastreid_model,
    save_like_fastreid,
    shapes,
)

pytest.importorskip("fastreid", reason="fast-reid's own package is the reference (pip install --no-deps fastreid)")

REL = 1e-3  # of the largest |feature|
MIN_COS = 1 - 1e-6

BAGTRICKS = """\
MODEL:
  META_ARCHITECTURE: Baseline
  BACKBONE: {NAME: build_resnet_backbone, DEPTH: 50x, LAST_STRIDE: 1, FEAT_DIM: 2048, NORM: BN, PRETRAIN: True}
  HEADS: {NAME: EmbeddingHead, NORM: BN, WITH_BNNECK: True, POOL_LAYER: GlobalAvgPool, NECK_FEAT: before,
          CLS_LAYER: Linear}
"""
SBS = """\
MODEL:
  META_ARCHITECTURE: Baseline
  BACKBONE: {NAME: build_resnet_backbone, DEPTH: 50x, LAST_STRIDE: 1, FEAT_DIM: 2048, NORM: BN, WITH_NL: True}
  HEADS: {NAME: EmbeddingHead, NORM: BN, WITH_BNNECK: True, POOL_LAYER: GeneralizedMeanPoolingP,
          NECK_FEAT: after, CLS_LAYER: CircleSoftmax, SCALE: 64, MARGIN: 0.35}
INPUT: {SIZE_TRAIN: [384, 128], SIZE_TEST: [384, 128]}
"""
VIT = """\
MODEL:
  META_ARCHITECTURE: Baseline
  PIXEL_MEAN: [127.5, 127.5, 127.5]
  PIXEL_STD: [127.5, 127.5, 127.5]
  BACKBONE: {NAME: build_vit_backbone, DEPTH: base, FEAT_DIM: 768, STRIDE_SIZE: "(16, 16)", PRETRAIN: True,
             DROP_PATH_RATIO: 0.1}
  HEADS: {NAME: EmbeddingHead, NORM: BN, WITH_BNNECK: True, POOL_LAYER: Identity, NECK_FEAT: before}
INPUT: {SIZE_TRAIN: [256, 128], SIZE_TEST: [256, 128]}
"""

# family -> (config text, opts, input height, width)
FAMILIES: dict[str, tuple[str, dict[str, Any], int, int]] = {
    # sbs_S50 (AGW_S50/bagtricks_S50 differ only in the head; fast-reid's ResNeSt ignores WITH_NL)
    "resnest": (SBS, {"MODEL.BACKBONE.NAME": "build_resnest_backbone"}, 64, 32),
    "mgn": (SBS, {"MODEL.META_ARCHITECTURE": "MGN", "MODEL.BACKBONE.WITH_NL": False,
                  "MODEL.BACKBONE.WITH_IBN": True, "MODEL.HEADS.EMBEDDING_DIM": 256}, 96, 32),
    # DEPTH small keeps the test fast (base is checked key for key below); overlapping 16x16 patches every
    # 12 pixels give a 3x2 grid, so the patch embedding's stride and the position embedding's size matter
    "vit": (VIT, {"MODEL.BACKBONE.DEPTH": "small", "MODEL.BACKBONE.STRIDE_SIZE": [12, 12],
                  "INPUT.SIZE_TRAIN": [40, 28], "INPUT.SIZE_TEST": [40, 28]}, 40, 28),
    # VeRi sbs_R50-ibn (VehicleID/VERIWild bagtricks_R50-ibn: GeM instead of GeM-P, no non-local)
    "vehicle": (SBS, {"MODEL.BACKBONE.WITH_IBN": True, "INPUT.SIZE_TRAIN": [64, 64], "INPUT.SIZE_TEST": [64, 64]},
                64, 64),
}


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


def config(tmp: Path, text: str, opts: dict[str, Any]) -> dict[str, Any]:
    path = tmp / "config.yml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, opts)


def inference_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: v for k, v in shapes(model.state_dict()).items() if not is_training_only(k)}


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, what
    scale = float(np.abs(ref).max())
    worst = float(np.abs(ours - ref).max())
    assert worst <= REL * scale, f"{what}: max |diff| {worst:.3g} > {REL} x max |feature| {scale:.3g}"
    cos = np.sum(ours * ref, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= MIN_COS, f"{what}: cosine {cos.min():.9f}"


@functools.cache
def built(family: str, folder: str) -> tuple[torch.nn.Module, torch.nn.Module, np.ndarray, np.ndarray]:
    """(fast-reid's model, reidbuild's model loaded from fast-reid's checkpoint, images, fast-reid's features)."""
    text, opts, h, w = FAMILIES[family]
    tmp = Path(folder) / family
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = config(tmp, text, opts)
    ref = fastreid_model(cfg, h, w)
    ours = build_model(cfg)
    load_weights(ours, save_like_fastreid(ref, tmp / "model_final.pth"))
    images = person_like_images(3, h, w, seed=7)
    return ref, ours, images, eval_features(ref, images)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("arch"))


# key names the README quotes
README_KEYS = {
    "resnest": ("backbone.conv1.6.weight", "backbone.layer2.0.conv2.fc1.bias", "heads.pool_layer.p"),
    "mgn": ("b2.1.0.downsample.0.weight", "b33_head.bottleneck.0.weight", "backbone.4.0.bn1.IN.weight"),
    "vit": ("backbone.pos_embed", "backbone.blocks.7.attn.qkv.weight", "heads.bottleneck.0.running_var"),
    "vehicle": ("backbone.NL_2.1.W.1.running_var", "backbone.layer3.5.bn1.IN.weight", "heads.bottleneck.0.weight"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_keys_shapes_and_eval_output_as_fastreid(family: str, folder: str) -> None:
    ref, ours, images, expected = built(family, folder)
    assert list(inference_shapes(ours).items()) == list(inference_shapes(ref).items())
    assert set(README_KEYS[family]) <= set(inference_shapes(ours))
    if family == "vit":  # (40 - 16) // 12 + 1 rows, (28 - 16) // 12 + 1 columns, plus the class token
        assert inference_shapes(ours)["backbone.pos_embed"] == (1, 3 * 2 + 1, 768)
    features = eval_features(ours, images)
    assert_close(features, expected, f"{family}: reidbuild vs fast-reid")
    # trained-like: different people get clearly different features
    cos = feature_cosines(expected)
    assert cos[np.triu_indices(len(cos), 1)].max() < 0.95


@functools.cache
def exported(family: str, folder: str) -> Any:
    """The ONNX model reidbuild's export and simplify stages make of the family's model."""
    _, ours, images, _ = built(family, folder)
    return export(ours, (1, 3) + images.shape[2:])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_export_matches_fastreid(family: str, folder: str) -> None:
    import onnxruntime as ort

    _, _, images, expected = built(family, folder)
    model = exported(family, folder)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_close(session.run(None, {"input": images})[0], expected, f"{family}: onnxruntime vs fast-reid")


@functools.cache
def converted(family: str, dialect: str, folder: str) -> tuple[Path, Path, str]:
    _, _, images, _ = built(family, folder)
    return write_caffe(Path(folder) / family, exported(family, folder), dialect, images.shape)


# ResNeSt in both dialects (its avg pools round up, its max pool pads); the others in the stricter bvlc one
CAFFE_CASES = [("resnest", dialect) for dialect in DIALECTS] + [("mgn", "bvlc"), ("vehicle", "bvlc")]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("family, dialect", CAFFE_CASES)
def test_caffe_conversion_matches_fastreid(family: str, dialect: str, runtime: str, folder: str) -> None:
    need(runtime)
    _, _, images, expected = built(family, folder)
    proto, weights, text = converted(family, dialect, folder)
    if family == "resnest":  # split attention: radix softmax and grouped conv in stock layers
        assert 'type: "Softmax"' in text and "group: 2" in text
    assert_close(run_caffe(proto, weights, runtime, images, dialect), expected, f"{family}: {runtime} {dialect} vs fast-reid")


def test_vit_is_refused_by_caffe_with_one_line(folder: str) -> None:
    _, _, images, _ = built("vit", folder)
    with pytest.raises(NotExpressible) as info:
        write_caffe(Path(folder) / "vit", exported("vit", folder), "ceil_mode", images.shape)
    message = str(info.value)
    assert "\n" not in message and "not expressible in Caffe" in message and "/backbone/" in message


@pytest.mark.parametrize("depth", list(RESNEST_DEPTHS))
def test_resnest_depths_have_fastreids_keys_and_shapes(depth: str, tmp_path: Path) -> None:
    from fastreid.modeling import build_model as fastreid_build

    from tests.fastreid.reference import fastreid_cfg

    cfg = config(tmp_path, BAGTRICKS, {"MODEL.BACKBONE.NAME": "build_resnest_backbone", "MODEL.BACKBONE.DEPTH": depth,
                                       "MODEL.BACKBONE.LAST_STRIDE": 2})
    assert list(inference_shapes(build_model(cfg)).items()) == list(inference_shapes(fastreid_build(fastreid_cfg(cfg))).items())


def test_resnest101_at_last_stride_2_gives_fastreids_output(tmp_path: Path) -> None:
    """The 64-wide stem and the undilated, strided layer4 (the family test covers 50x at LAST_STRIDE 1);
    200x/269x differ from 101x only in block counts, checked above."""
    cfg = config(tmp_path, BAGTRICKS, {"MODEL.BACKBONE.NAME": "build_resnest_backbone", "MODEL.BACKBONE.DEPTH": "101x",
                                       "MODEL.BACKBONE.LAST_STRIDE": 2})
    ref = fastreid_model(cfg, 64, 32)
    ours = build_model(cfg)
    load_weights(ours, save_like_fastreid(ref, tmp_path / "model_final.pth"))
    images = person_like_images(3, 64, 32, seed=7)
    assert_close(eval_features(ours, images), eval_features(ref, images), "ResNeSt-101 LAST_STRIDE 2")


def test_vit_base_has_fastreids_keys_and_shapes(tmp_path: Path) -> None:
    from fastreid.modeling import build_model as fastreid_build

    from tests.fastreid.reference import fastreid_cfg

    cfg = config(tmp_path, VIT, {})
    ours = inference_shapes(build_model(cfg))
    assert ours == inference_shapes(fastreid_build(fastreid_cfg(cfg)))
    assert ours["backbone.pos_embed"] == (1, 16 * 8 + 1, 768) and len([k for k in ours if k.endswith("attn.qkv.bias")]) == 12


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("name", UNSUPPORTED_BACKBONES)
def test_other_fastreid_backbones_are_refused_by_name(name: str, tmp_path: Path) -> None:
    import fastreid.modeling.backbones as registered

    assert callable(registered.BACKBONE_REGISTRY.get(name))  # a backbone fast-reid really has
    with pytest.raises(ConfigError) as info:
        config(tmp_path, BAGTRICKS, {"MODEL.BACKBONE.NAME": name})
    message = str(info.value)
    assert "\n" not in message and name in message and "does not build" in message
    assert all(supported in message for supported in BACKBONES)
    assert info.value.exit_code == 2


def test_registry_covers_every_fastreid_backbone() -> None:
    import inspect

    import fastreid.modeling.backbones as package

    # every builder fast-reid registers is defined in a module of its backbones package
    names = {name for module in _submodules(package) for name, obj in inspect.getmembers(module, inspect.isfunction)
             if name.startswith("build_") and name.endswith("_backbone") and obj.__module__ == module.__name__}
    names.discard("build_backbone")
    assert names == set(BACKBONES) | set(UNSUPPORTED_BACKBONES)
    for name in names:
        assert callable(package.BACKBONE_REGISTRY.get(name))


def _submodules(package: Any) -> list[Any]:
    import importlib
    import pkgutil

    return [importlib.import_module(info.name) for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


@pytest.mark.parametrize("text, opts, size, needle", [
    (VIT, {}, (256, 256), "differs from INPUT.SIZE_TRAIN 256x128"),
    (SBS, {"MODEL.META_ARCHITECTURE": "MGN", "MODEL.BACKBONE.WITH_NL": False}, (64, 32), "cannot cut into 3 stripes"),
])
def test_input_sizes_the_architecture_cannot_take_are_refused(text: str, opts: dict, size: tuple[int, int],
                                                              needle: str, tmp_path: Path) -> None:
    from reidbuild.fastreid.config import check_input_size

    cfg = config(tmp_path, text, opts)
    with pytest.raises(ConfigError, match=needle):
        check_input_size(cfg, *size, "config.yml")
    check_input_size(cfg, *cfg["INPUT"]["SIZE_TEST"], "config.yml")  # the configured size is fine


def test_mgn_needs_a_bottleneck_resnet(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MGN needs build_resnet_backbone"):
        config(tmp_path, SBS, {"MODEL.META_ARCHITECTURE": "MGN", "MODEL.BACKBONE.NAME": "build_resnest_backbone"})


# ------------------------------------------------------------------------------------------ the pipeline


def test_vit_manifest_builds_onnx_with_parity_while_caffe_is_refused(folder: str, tmp_path: Path) -> None:
    """targets onnx + caffe on a ViT: exit 5 with one line naming the layer, yet the ONNX model is built and
    its onnxruntime parity ran and passed; the lock records the Caffe stage as refused."""
    from click.testing import CliRunner

    from reidbuild import lockfile
    from reidbuild.cli import main
    from tests.helpers import REPO, write

    text, _, h, w = FAMILIES["vit"]
    ref, _, _, _ = built("vit", folder)
    save_like_fastreid(ref, tmp_path / "model_final.pth")
    body = (textwrap.dedent(text).replace("DEPTH: base", "DEPTH: small").replace("[256, 128]", f"[{h}, {w}]")
            .replace('"(16, 16)"', '"(12, 12)"'))
    write(tmp_path / "config.yml", body)
    (tmp_path / "imgs").mkdir()
    for src in sorted((REPO / "test_data").glob("*.png"))[:4]:
        (tmp_path / "imgs" / src.name).write_bytes(src.read_bytes())
    manifest = write(tmp_path / "m.yml", f"""\
        version: 1
        name: vit
        source: {{format: fastreid, config: config.yml, weights: model_final.pth}}
        input: {{height: {h}, width: {w}}}
        output_dir: out
        targets:
          caffe: {{dialect: ceil_mode}}
        parity:
          images: imgs/*.png
          backends: [onnxruntime, caffe]
          rtol: 1.0e-3
          atol: 1.0e-4
        """)
    result = CliRunner().invoke(main, ["apply", str(manifest)], catch_exceptions=False)
    error_lines = [line for line in result.stderr.splitlines() if "not expressible" in line]
    assert result.exit_code == 5, result.stdout + result.stderr
    assert len(error_lines) >= 1 and "Caffe" in error_lines[-1]
    lock = lockfile.read(tmp_path / "m.lock")
    assert lock.stages["caffe.convert"].status == "refused"
    assert lock.stages["parity.onnxruntime"].status == "ok"
    assert lock.stages["parity.caffe"].status == "skipped"
    assert (tmp_path / "out" / "vit.onnx").is_file()
    # an input size the ViT cannot take is refused before anything is built
    wrong = write(tmp_path / "wrong.yml", manifest.read_text().replace(f"height: {h}", f"height: {2 * h}"))
    result = CliRunner().invoke(main, ["apply", str(wrong)], catch_exceptions=False)
    assert result.exit_code == 2 and "differs from INPUT.SIZE_TRAIN" in result.stderr
