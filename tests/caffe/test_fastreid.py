"""Supported fast-reid architectures end to end: build -> ONNX -> Caffe -> pycaffe/OpenCV vs PyTorch.

Small inputs (64x32) keep the folder fast; every block type still runs (stem ceil max-pool, IBN in layers 1-3,
SE in every block, Non-local blocks in layers 2-3 of R50, GeM/GeM-P pooling, BN neck).

Tolerance: rtol=1e-4, atol=5e-5 on features of magnitude up to ~20 after 18-50 float32 layers. Caffe and
OpenCV sum convolutions in another order than PyTorch (OpenCV also fuses BatchNorm/Scale into them), so the
rounding differences grow with depth: measured max abs diffs are <= 1.1e-5 (R50 AGW/SBS, 64x32 and
256x128), so the bound has ~4x headroom; a structural mistake (wrong rounding, a dropped eps, a
mis-associated product) is off by 1e-2 or more. Cosine similarity (in float64) must exceed 1 - 1e-6.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from reidbuild import fastreid
from tests.caffe._util import DIALECTS, RUNTIMES, export, need, rand, run_caffe, torch_ref, write_caffe


RTOL, ATOL = 1e-4, 5e-5
HW = (64, 32)

CONFIGS = {
    # bagtricks: GAP + BN neck
    "R18": ("18x", {}),
    # IBN-a + SE + GeM together (each block also has its own tiny test in test_layers.py)
    "R18-IBN-SE-GeM": ("18x", {"MODEL.BACKBONE.WITH_IBN": True, "MODEL.BACKBONE.WITH_SE": True,
                               "MODEL.HEADS.POOL_LAYER": "GeneralizedMeanPooling"}),
    # AGW: Non-local + GeM; SBS: IBN + Non-local + GeM-P, neck feature after the BN
    "R50-AGW": ("50x", {"MODEL.BACKBONE.WITH_NL": True, "MODEL.HEADS.POOL_LAYER": "GeneralizedMeanPooling"}),
    "R50-SBS-IBN": ("50x", {"MODEL.BACKBONE.WITH_IBN": True, "MODEL.BACKBONE.WITH_NL": True,
                            "MODEL.HEADS.POOL_LAYER": "GeneralizedMeanPoolingP", "MODEL.HEADS.NECK_FEAT": "after"}),
}

BASE = """\
MODEL:
  META_ARCHITECTURE: Baseline
  BACKBONE:
    NAME: build_resnet_backbone
    LAST_STRIDE: 1
  HEADS:
    NAME: EmbeddingHead
    WITH_BNNECK: True
"""


@functools.lru_cache(maxsize=None)
def _built(name: str, cfg_dir: str):
    depth, opts = CONFIGS[name]
    path = Path(cfg_dir) / "base.yml"
    path.write_text(BASE)
    merged = {"MODEL.BACKBONE.DEPTH": depth, "MODEL.BACKBONE.FEAT_DIM": 512 if depth == "18x" else 2048, **opts}
    model = fastreid.build_model(fastreid.load_config(path, merged))
    fastreid.init_random(model, 1)
    x = rand((2, 3) + HW, seed=11, low=0, high=255)
    return export(model, (1, 3) + HW), x, torch_ref(model, x)


@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fastreid_cfg"))


@functools.lru_cache(maxsize=None)
def _converted(name: str, dialect: str, cfg_dir: str):
    model, x, ref = _built(name, cfg_dir)
    folder = Path(cfg_dir) / name
    folder.mkdir(exist_ok=True)
    proto, caffemodel, text = write_caffe(folder, model, dialect, (2, 3) + HW)
    return proto, caffemodel, text, x, ref


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fastreid_config_converts_with_passing_parity(name, runtime, cfg_dir):
    need(runtime)
    for dialect in DIALECTS:
        proto, caffemodel, text, x, ref = _converted(name, dialect, cfg_dir)
        if "IBN" in name:
            assert '"MVN"' in text
        out = run_caffe(proto, caffemodel, runtime, x)
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL, err_msg=f"{name} {dialect} {runtime}")
        o, r = out.astype(np.float64), ref.astype(np.float64)
        cos = np.sum(o * r, 1) / np.linalg.norm(o, axis=1) / np.linalg.norm(r, axis=1)
        assert cos.min() > 1 - 1e-6, (name, dialect, runtime, cos)
