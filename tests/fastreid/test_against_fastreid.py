"""reidbuild's built-in architectures against fast-reid's own modules (the installed fastreid package).

For each configuration below, fast-reid's ``build_model`` builds the model, it gets trained-like weights and
is saved by fast-reid's ``Checkpointer`` with the config fast-reid's ``cfg.dump()`` writes; reidbuild then reads
that config and checkpoint. Checked: the state-dict keys (in order) and shapes equal fast-reid's, training-only
keys aside, and both models give the same features on the same images, compared in float64 (in float32,
IBN's InstanceNorm over a 4x2 map amplifies the kernels' rounding to ~1e-3 of the features' scale; in float64
the two agree to ~1e-11, so any difference beyond rounding is a real one). The README quotes len(CONFIGS).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from reidbuild.fastreid import build_model, is_training_only, load_config, load_weights
from reidbuild.testing import make_trained_like, person_like_images
from tests.zoo import corpus

pytest.importorskip("fastreid", reason="fast-reid's package is the reference: `make test` installs fastreid==1.4.0")

REPO = Path(__file__).resolve().parents[2]
HW = (64, 32)
FEAT = {"18x": 512, "34x": 512, "50x": 2048, "101x": 2048}
POOLS = ["Identity", "GlobalAvgPool", "GlobalMaxPool", "FastGlobalAvgPool", "GeneralizedMeanPooling",
         "GeneralizedMeanPoolingP", "AdaptiveAvgMaxPool", "ClipGlobalAvgPool"]
ALL_FLAGS = ((), ("IBN",), ("SE",), ("NL",), ("IBN", "SE", "NL"))


def _grid() -> dict[str, dict]:
    grid: dict[str, dict] = {}
    # every depth plain and with all block options together; R18 and R50 also with each option alone
    # (R101's nine cubic Non-local blocks overflow on a 64x32 input; the corpus covers R101 NL at 256x128/384x128)
    variants = {"18x": ALL_FLAGS, "34x": ((), ("IBN", "SE", "NL")), "50x": ALL_FLAGS, "101x": ((), ("IBN", "SE"))}
    for depth, flag_sets in variants.items():
        for flags in flag_sets:
            grid["-".join((f"R{depth[:-1]}",) + flags)] = {"DEPTH": depth, **{f"WITH_{f}": True for f in flags}}
    for pool in POOLS:  # every pooling layer (R18)
        grid[f"R18-{pool}"] = {"DEPTH": "18x", "POOL_LAYER": pool}
    for emb in (0, 256):  # embedding layer / BN neck combinations (R18)
        for bnneck in (False, True):
            grid[f"R18-emb{emb}-bnneck{int(bnneck)}"] = {"DEPTH": "18x", "EMBEDDING_DIM": emb, "WITH_BNNECK": bnneck}
    grid["R18-last-stride-2"] = {"DEPTH": "18x", "LAST_STRIDE": 2}
    for norm in ("syncBN", "GhostBN"):  # the other norms (backbone and head)
        grid[f"R18-{norm}"] = {"DEPTH": "18x", "NORM": norm}
    return grid


CONFIGS = _grid()
_HEAD_KEYS = ("POOL_LAYER", "EMBEDDING_DIM", "WITH_BNNECK")


def _fastreid_cfg(spec: dict):
    from fastreid.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.FEAT_DIM = FEAT[spec["DEPTH"]]
    cfg.MODEL.HEADS.NUM_CLASSES = 16
    cfg.MODEL.HEADS.WITH_BNNECK = True
    cfg.INPUT.SIZE_TEST = list(HW)
    for key, value in spec.items():
        for section in (cfg.MODEL.HEADS, cfg.MODEL.BACKBONE):
            if key in section and (key == "NORM" or (section is cfg.MODEL.HEADS) == (key in _HEAD_KEYS)):
                setattr(section, key, value)
    return cfg


@pytest.mark.parametrize("name", list(CONFIGS))
def test_builtin_model_equals_fastreids(name: str, tmp_path: Path) -> None:
    from fastreid.modeling import build_model as fastreid_build
    from fastreid.utils.checkpoint import Checkpointer

    cfg = _fastreid_cfg(CONFIGS[name])
    (tmp_path / "config.yaml").write_text(cfg.dump())  # as training writes it: DEVICE cuda, before the CPU switch
    cfg.MODEL.DEVICE, cfg.MODEL.BACKBONE.PRETRAIN = "cpu", False
    theirs = make_trained_like(fastreid_build(cfg), person_like_images(4, *HW, seed=3), seed=5)
    Checkpointer(theirs, str(tmp_path)).save("model_final")

    ours = build_model(load_config(tmp_path / "config.yaml"))
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items() if not is_training_only(k)]
    assert shapes(ours) == shapes(theirs)
    assert {k for k in theirs.state_dict() if is_training_only(k) and not k.endswith("num_batches_tracked")} == \
        {"heads.weight"}

    load_weights(ours, tmp_path / "model_final.pth")
    x = torch.from_numpy(np.rint(person_like_images(3, *HW, seed=11))).double()
    with torch.no_grad():  # float64: the same computation agrees to ~1e-11 whatever the kernels' rounding
        want = theirs.double().eval()(x.clone()).numpy()  # a copy: fast-reid normalises its input in place
        got = ours.double().eval()(x.clone()).numpy()
    assert np.isfinite(want).all() and np.abs(want).max() > 1e-3
    assert corpus.mean_cosine_between_images(want) < corpus.MAX_MEAN_COSINE_BETWEEN_IMAGES
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())


def test_readme_quotes_the_number_of_configurations() -> None:
    text = (REPO / "README.md").read_text()
    found = re.search(r"fast-reid's own modules in (\d+) configurations", text)
    assert found and int(found.group(1)) == len(CONFIGS), found and found.group(0)
