"""fast-reid config loading: _BASE_ chains, defaults, yacs-style decoding and opts, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reidbuild.errors import ConfigError
from reidbuild.fastreid import build_model, load_config, supported

BASE = """\
MODEL:
  META_ARCHITECTURE: Baseline
  BACKBONE:
    NAME: build_resnet_backbone
    NORM: BN
    DEPTH: 50x
    LAST_STRIDE: 1
    FEAT_DIM: 2048
    WITH_IBN: False
    PRETRAIN: True
  HEADS:
    NAME: EmbeddingHead
    NORM: BN
    WITH_BNNECK: True
    POOL_LAYER: GlobalAvgPool
    NECK_FEAT: before
    CLS_LAYER: Linear
  LOSSES:
    NAME: ("CrossEntropyLoss", "TripletLoss",)
    CE:
      EPSILON: 0.1
INPUT:
  SIZE_TRAIN: [ 256, 128 ]
  SIZE_TEST: [ 256, 128 ]
  REA:
    ENABLED: True
SOLVER:
  OPT: Adam
  BASE_LR: 0.00035
  WARMUP_FACTOR: 1e-1
  STEPS: [ 40, 90 ]
CUDNN_BENCHMARK: True
"""

MID = """\
_BASE_: ../Base-test.yml
MODEL:
  BACKBONE:
    WITH_NL: True
  HEADS:
    NECK_FEAT: after
    POOL_LAYER: GeneralizedMeanPoolingP
    CLS_LAYER: CircleSoftmax
    SCALE: 64
    MARGIN: 0.35
INPUT:
  SIZE_TEST: [ 384, 128 ]
"""

LEAF = """\
_BASE_: mid.yml
MODEL:
  BACKBONE:
    DEPTH: 101x
    WITH_IBN: True
DATASETS:
  NAMES: ("Market1501",)
  TESTS: ("Market1501",)
OUTPUT_DIR: logs/market1501/leaf
"""

# What fast-reid's cfg.dump() writes next to model_final.pth (abridged but in its exact style:
# every section, lists as YAML sequences, the training machine's device and pretrain path).
DUMPED = """\
CUDNN_BENCHMARK: true
DATALOADER:
  NUM_INSTANCE: 16
  NUM_WORKERS: 8
  SAMPLER_TRAIN: NaiveIdentitySampler
  SET_WEIGHT: []
DATASETS:
  COMBINEALL: false
  NAMES:
  - Market1501
  TESTS:
  - Market1501
INPUT:
  AFFINE:
    ENABLED: false
  AUGMIX:
    ENABLED: false
    PROB: 0.0
  CJ:
    BRIGHTNESS: 0.15
    CONTRAST: 0.15
    ENABLED: false
    HUE: 0.1
    PROB: 0.5
    SATURATION: 0.1
  CROP:
    ENABLED: false
    RATIO:
    - 0.75
    - 1.3333333333333333
    SCALE:
    - 0.16
    - 1
    SIZE:
    - 224
    - 224
  FLIP:
    ENABLED: true
    PROB: 0.5
  PADDING:
    ENABLED: true
    MODE: constant
    SIZE: 10
  SIZE_TEST:
  - 384
  - 128
  SIZE_TRAIN:
  - 384
  - 128
KD:
  EMA:
    ENABLED: false
    MOMENTUM: 0.999
  MODEL_CONFIG: []
  MODEL_WEIGHTS: []
MODEL:
  BACKBONE:
    ATT_DROP_RATE: 0.0
    DEPTH: 50x
    DROP_PATH_RATIO: 0.1
    DROP_RATIO: 0.0
    FEAT_DIM: 2048
    LAST_STRIDE: 1
    NAME: build_resnet_backbone
    NORM: BN
    PRETRAIN: true
    PRETRAIN_PATH: /home/trainer/.cache/torch/checkpoints/resnet50_ibn_a-d9d0bb7b.pth
    SIE_COE: 3.0
    STRIDE_SIZE:
    - 16
    - 16
    WITH_IBN: true
    WITH_NL: true
    WITH_SE: false
  DEVICE: cuda
  FREEZE_LAYERS:
  - backbone
  HEADS:
    CLS_LAYER: CircleSoftmax
    EMBEDDING_DIM: 0
    MARGIN: 0.35
    NAME: EmbeddingHead
    NECK_FEAT: after
    NORM: BN
    NUM_CLASSES: 751
    POOL_LAYER: GeneralizedMeanPoolingP
    SCALE: 64
    WITH_BNNECK: true
  LOSSES:
    CE:
      ALPHA: 0.2
      EPSILON: 0.1
      SCALE: 1.0
    NAME:
    - CrossEntropyLoss
    - TripletLoss
    TRI:
      HARD_MINING: true
      MARGIN: 0.0
      NORM_FEAT: false
      SCALE: 1.0
  META_ARCHITECTURE: Baseline
  PIXEL_MEAN:
  - 123.675
  - 116.28
  - 103.53
  PIXEL_STD:
  - 58.395
  - 57.120000000000005
  - 57.375
  QUEUE_SIZE: 8192
  WEIGHTS: ''
OUTPUT_DIR: logs/market1501/sbs_R50-ibn
SOLVER:
  AMP:
    ENABLED: true
  BASE_LR: 0.00035
  BIAS_LR_FACTOR: 1.0
  CHECKPOINT_PERIOD: 60
  CLIP_GRADIENTS:
    CLIP_TYPE: norm
    CLIP_VALUE: 5.0
    ENABLED: false
    NORM_TYPE: 2.0
  DELAY_EPOCHS: 30
  ETA_MIN_LR: 7.7e-07
  FREEZE_ITERS: 1000
  GAMMA: 0.1
  MAX_EPOCH: 60
  MOMENTUM: 0.9
  NESTEROV: false
  OPT: Adam
  SCHED: CosineAnnealingLR
  STEPS:
  - 40
  - 90
  WARMUP_FACTOR: 0.1
  WARMUP_ITERS: 2000
  WARMUP_METHOD: linear
  WEIGHT_DECAY: 0.0005
TEST:
  AQE:
    ALPHA: 3.0
    ENABLED: false
    QE_K: 5
    QE_TIME: 1
  EVAL_PERIOD: 10
  FLIP:
    ENABLED: false
  IMS_PER_BATCH: 128
  METRIC: cosine
  RERANK:
    ENABLED: false
    K1: 20
    K2: 6
    LAMBDA: 0.3
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    write(tmp_path / "configs" / "Base-test.yml", BASE)
    write(tmp_path / "configs" / "Market" / "mid.yml", MID)
    return write(tmp_path / "configs" / "Market" / "leaf.yml", LEAF)


def one_line_error(exc_info: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- _BASE_ chains


def test_base_chain_is_merged_leaf_last(chain: Path) -> None:
    cfg = load_config(chain)
    bb, hd = cfg["MODEL"]["BACKBONE"], cfg["MODEL"]["HEADS"]
    # leaf overrides mid and base
    assert bb["DEPTH"] == "101x" and bb["WITH_IBN"] is True
    # mid (one directory down from base, _BASE_ relative to mid's own folder) overrides base
    assert bb["WITH_NL"] is True
    assert hd["POOL_LAYER"] == "GeneralizedMeanPoolingP"
    assert hd["NECK_FEAT"] == "after" and hd["SCALE"] == 64 and hd["MARGIN"] == 0.35
    assert cfg["INPUT"]["SIZE_TEST"] == [384, 128]
    # from base only
    assert bb["LAST_STRIDE"] == 1 and hd["WITH_BNNECK"] is True and cfg["INPUT"]["SIZE_TRAIN"] == [256, 128]
    # defaults fill what no file sets
    assert hd["EMBEDDING_DIM"] == 0 and bb["WITH_SE"] is False
    assert cfg["MODEL"]["PIXEL_MEAN"] == [0.485 * 255, 0.456 * 255, 0.406 * 255]
    assert cfg["MODEL"]["PIXEL_STD"] == [0.229 * 255, 0.224 * 255, 0.225 * 255]
    assert "_BASE_" not in cfg


def test_strings_are_decoded_like_yacs(chain: Path) -> None:
    cfg = load_config(chain)
    # ("A", "B",) written as a YAML string is a tuple for yacs (a list here, for JSON)
    assert cfg["MODEL"]["LOSSES"]["NAME"] == ["CrossEntropyLoss", "TripletLoss"]
    assert cfg["DATASETS"]["NAMES"] == ["Market1501"]
    # YAML reads 1e-1 as a string; yacs literal-evals it to a float
    assert cfg["SOLVER"]["WARMUP_FACTOR"] == pytest.approx(0.1) and isinstance(cfg["SOLVER"]["WARMUP_FACTOR"], float)
    assert cfg["MODEL"]["BACKBONE"]["DEPTH"] == "101x"  # not a literal: stays a string


def test_keys_fast_reid_has_outside_the_model_are_kept(chain: Path) -> None:
    cfg = load_config(chain)
    assert cfg["SOLVER"]["OPT"] == "Adam" and cfg["SOLVER"]["STEPS"] == [40, 90]
    assert cfg["CUDNN_BENCHMARK"] is True and cfg["OUTPUT_DIR"] == "logs/market1501/leaf"
    assert cfg["INPUT"]["REA"] == {"ENABLED": True}


def test_result_is_plain_json(chain: Path) -> None:
    cfg = load_config(chain)
    assert json.loads(json.dumps(cfg)) == cfg
    assert load_config(chain) == cfg  # deterministic


def test_base_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "a.yml", "_BASE_: b.yml\nMODEL:\n  BACKBONE:\n    DEPTH: 50x\n")
    write(tmp_path / "b.yml", "_BASE_: a.yml\nMODEL:\n  HEADS:\n    WITH_BNNECK: True\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "a.yml")
    assert "cycle" in one_line_error(info)


def test_self_base_is_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yml", "_BASE_: ./a.yml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yml")


def test_missing_base_names_both_files(tmp_path: Path) -> None:
    leaf = write(tmp_path / "leaf.yml", "_BASE_: Base-missing.yml\n")
    with pytest.raises(ConfigError) as info:
        load_config(leaf)
    message = one_line_error(info)
    assert "leaf.yml" in message and "Base-missing.yml" in message


def test_remote_base_is_refused(tmp_path: Path) -> None:
    leaf = write(tmp_path / "leaf.yml", "_BASE_: https://example.com/Base.yml\n")
    with pytest.raises(ConfigError, match="URL"):
        load_config(leaf)


def test_type_error_names_the_file_that_set_the_key(tmp_path: Path) -> None:
    write(tmp_path / "base.yml", "MODEL:\n  HEADS:\n    EMBEDDING_DIM: wide\n")
    leaf = write(tmp_path / "leaf.yml", "_BASE_: base.yml\nMODEL:\n  HEADS:\n    WITH_BNNECK: True\n")
    with pytest.raises(ConfigError) as info:
        load_config(leaf)
    message = one_line_error(info)
    assert "base.yml" in message and "leaf.yml" not in message
    assert "MODEL.HEADS.EMBEDDING_DIM" in message and "int" in message


# --------------------------------------------------------------------------- dumped configs


def test_dumped_training_config_is_accepted_and_builds_on_cpu(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", DUMPED)
    cfg = load_config(path)
    assert cfg["MODEL"]["DEVICE"] == "cuda"  # kept as written, never acted on
    assert cfg["MODEL"]["BACKBONE"]["PRETRAIN"] is True
    assert cfg["MODEL"]["HEADS"]["NUM_CLASSES"] == 751
    assert cfg["KD"]["MODEL_CONFIG"] == [] and cfg["TEST"]["RERANK"]["K1"] == 20
    assert not Path(cfg["MODEL"]["BACKBONE"]["PRETRAIN_PATH"]).exists()
    model = build_model(cfg)  # must not try to read PRETRAIN_PATH nor touch CUDA
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not model.training
    assert "backbone.layer1.0.bn1.IN.weight" in model.state_dict()
    assert "backbone.NL_3.2.W.1.running_var" in model.state_dict()


# --------------------------------------------------------------------------- opts


def test_opts_override_with_literal_decoding(chain: Path) -> None:
    cfg = load_config(chain, {
        "MODEL.HEADS.POOL_LAYER": "GlobalAvgPool",
        "MODEL.BACKBONE.WITH_IBN": "False",
        "INPUT.SIZE_TEST": "[256, 128]",
        "MODEL.HEADS.EMBEDDING_DIM": 256,
        "MODEL.HEADS.MARGIN": 0,  # int where fast-reid has a float: widened
        "SOLVER.BASE_LR": "3e-4",  # a key fast-reid has outside MODEL, present in the file
    })
    hd = cfg["MODEL"]["HEADS"]
    assert hd["POOL_LAYER"] == "GlobalAvgPool" and hd["EMBEDDING_DIM"] == 256
    assert cfg["MODEL"]["BACKBONE"]["WITH_IBN"] is False
    assert cfg["INPUT"]["SIZE_TEST"] == [256, 128]
    assert hd["MARGIN"] == 0.0 and isinstance(hd["MARGIN"], float)
    assert cfg["SOLVER"]["BASE_LR"] == pytest.approx(3e-4)


@pytest.mark.parametrize("opts, needle", [
    ({"MODEL.BACKBONE.WITH_IBN": "yes"}, "MODEL.BACKBONE.WITH_IBN"),
    ({"MODEL.HEADS.EMBEDDING_DIM": "1.5"}, "MODEL.HEADS.EMBEDDING_DIM"),
    ({"MODEL.HEADS.WITH_BNNECK": 1}, "MODEL.HEADS.WITH_BNNECK"),
    ({"MODEL.HEADS.POOL_LAYR": "GlobalAvgPool"}, "unknown config key MODEL.HEADS.POOL_LAYR"),
    ({"SOLVER.NOT_A_KEY": 1}, "unknown config key SOLVER.NOT_A_KEY"),
    ({"MODEL.BACKBONE": "x"}, "section"),
    ({"_BASE_": "other.yml"}, "_BASE_"),
    ({"MODEL..DEPTH": "50x"}, "dotted"),
])
def test_bad_opts_are_config_errors(chain: Path, opts: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(chain, opts)
    assert needle in one_line_error(info)


# --------------------------------------------------------------------------- unsupported / invalid


@pytest.mark.parametrize("key, value, listed", [
    ("MODEL.META_ARCHITECTURE", "Distiller", "Baseline, MGN"),
    ("MODEL.BACKBONE.NAME", "build_resnet_backbone_x", "build_resnet_backbone, build_resnest_backbone"),
    ("MODEL.BACKBONE.NAME", "build_osnet_backbone", "build_vit_backbone"),
    ("MODEL.HEADS.NAME", "ClasHead", "EmbeddingHead"),
    ("MODEL.BACKBONE.DEPTH", "152x", "101x"),
    ("MODEL.BACKBONE.NORM", "GN", "GhostBN"),
    ("MODEL.HEADS.POOL_LAYER", "SoftPool", "GeneralizedMeanPoolingP"),
    ("MODEL.HEADS.POOL_LAYER", "Flatten", "GlobalAvgPool"),
    ("MODEL.HEADS.NECK_FEAT", "middle", "after"),
    ("MODEL.BACKBONE.LAST_STRIDE", 3, "1, 2"),
])
def test_unsupported_choices_list_what_is_supported(minimal_yaml: Path, key: str, value: object, listed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(minimal_yaml, {key: value, "MODEL.HEADS.WITH_BNNECK": True})
    message = one_line_error(info)
    assert key in message and listed in message and str(minimal_yaml) in message


def test_unsupported_architecture_in_file(tmp_path: Path) -> None:
    path = write(tmp_path / "moco.yml", "MODEL:\n  META_ARCHITECTURE: MoCo\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = one_line_error(info)
    assert "MoCo" in message and "Baseline, MGN" in message and "moco.yml" in message


def test_feat_dim_must_match_the_backbone(minimal_yaml: Path) -> None:
    with pytest.raises(ConfigError, match="FEAT_DIM=2048"):
        load_config(minimal_yaml, {"MODEL.BACKBONE.DEPTH": "18x"})  # default FEAT_DIM is ResNet-50's


def test_legacy_pool_names_are_accepted(minimal_yaml: Path) -> None:
    cfg = load_config(minimal_yaml, {"MODEL.HEADS.POOL_LAYER": "gempoolP"})
    assert cfg["MODEL"]["HEADS"]["POOL_LAYER"] == "gempoolP"
    assert "heads.pool_layer.p" in build_model(cfg).state_dict()


def test_typo_in_architecture_section_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "typo.yml", "MODEL:\n  BACKBONE:\n    WITH_IBNN: True\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "MODEL.BACKBONE.WITH_IBNN" in one_line_error(info)


def test_pre_v03_config_is_recognised(tmp_path: Path) -> None:
    path = write(tmp_path / "old.yml", "MODEL:\n  HEADS:\n    REDUCTION_DIM: 512\n")
    with pytest.raises(ConfigError, match="older than v0.3"):
        load_config(path)


@pytest.mark.parametrize("text, needle", [
    ("MODEL: [unclosed\n", "invalid YAML"),
    ("", "must be a mapping"),
    ("- MODEL\n- INPUT\n", "must be a mapping"),
    ("MODEL: {}\nMODEL: {}\n", "duplicate key 'MODEL'"),
    ("MODEL:\n  PIXEL_MEAN: [1, 2]\n", "MODEL.PIXEL_MEAN"),
    ("MODEL:\n  PIXEL_STD: [58.0, 0, 57.0]\n", "MODEL.PIXEL_STD"),
    ("INPUT:\n  SIZE_TEST: [256]\n", "INPUT.SIZE_TEST"),
    ("MODEL:\n  BACKBONE: 50x\n", "MODEL.BACKBONE"),
    ("MODEL:\n  WEIGHTS: 2021-01-01\n", "date"),
    ("1: x\n", "must be a string"),
    ("a: &x [*x]\n", "nesting deeper"),
    ("MODEL:\n  HEADS:\n    _BASE_: x.yml\n", "reserved"),
    ("_BASE_: [a.yml]\n", "_BASE_"),
])
def test_invalid_files_are_config_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path / "bad.yml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = one_line_error(info)
    assert needle in message and "bad.yml" in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)


def test_python_yaml_tags_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = write(tmp_path / "evil.yml", f"MODEL:\n  WEIGHTS: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "tag" in one_line_error(info)
    assert not marker.exists()


def test_supported_describes_the_choices() -> None:
    info = supported()
    assert info["MODEL.META_ARCHITECTURE"] == ["Baseline", "MGN"]
    assert info["MODEL.BACKBONE.NAME"] == ["build_resnet_backbone", "build_resnest_backbone", "build_vit_backbone"]
    assert info["MODEL.BACKBONE.DEPTH"] == ["18x", "34x", "50x", "101x", "200x", "269x", "small", "base"]
    assert {"BN", "syncBN", "GhostBN"} == set(info["MODEL.BACKBONE.NORM"])
    assert {"GlobalAvgPool", "FastGlobalAvgPool", "GlobalMaxPool", "GeneralizedMeanPooling", "GeneralizedMeanPoolingP",
            "AdaptiveAvgMaxPool", "ClipGlobalAvgPool", "Identity", "avgpool", "gempoolP"} <= set(info["MODEL.HEADS.POOL_LAYER"])
    json.dumps(info)


def test_build_model_rejects_an_unchecked_bad_dict(minimal_yaml: Path) -> None:
    cfg = load_config(minimal_yaml)
    cfg["MODEL"]["BACKBONE"]["DEPTH"] = "200x"
    with pytest.raises(ConfigError, match="DEPTH"):
        build_model(cfg)
    del cfg["MODEL"]["HEADS"]
    with pytest.raises(ConfigError, match="MODEL.HEADS"):
        build_model(cfg)
    assert torch.get_default_dtype() == torch.float32
