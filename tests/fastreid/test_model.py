"""The rebuilt Baseline: exact fast-reid state_dict layout, forward semantics, ONNX export.

Key names, shapes and counts below were written down from fast-reid's source
(fastreid/modeling/backbones/resnet.py, layers/{batch_norm,se_layer,non_local,pooling}.py,
heads/embedding_head.py, meta_arch/baseline.py); fast-reid's own state_dict additionally
holds the training-only classifier ``heads.weight``, which is not part of ours.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

POOLS = [
    "Identity", "GlobalAvgPool", "FastGlobalAvgPool", "GlobalMaxPool", "GeneralizedMeanPooling",
    "GeneralizedMeanPoolingP", "AdaptiveAvgMaxPool", "ClipGlobalAvgPool",
]

R50_IBN_SE_NL = {
    "MODEL.BACKBONE.WITH_IBN": True, "MODEL.BACKBONE.WITH_SE": True, "MODEL.BACKBONE.WITH_NL": True,
    "MODEL.HEADS.POOL_LAYER": "GeneralizedMeanPoolingP", "MODEL.HEADS.EMBEDDING_DIM": 256,
    "MODEL.HEADS.WITH_BNNECK": True,
}

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# fast-reid key -> shape, for ResNet-50 IBN-a + SE + Non-local, GeM-P pooling, 256-d embedding, BN neck.
EXPECTED_R50_IBN_SE_NL: dict[str, list[int]] = {
    "backbone.conv1.weight": [64, 3, 7, 7],
    **{f"backbone.bn1.{n}": [64] for n in BN[:4]},
    "backbone.bn1.num_batches_tracked": [],
    "backbone.layer1.0.conv1.weight": [64, 64, 1, 1],
    # IBN-a: InstanceNorm(affine) on int(64/2) channels, BN on the rest
    "backbone.layer1.0.bn1.IN.weight": [32],
    "backbone.layer1.0.bn1.IN.bias": [32],
    **{f"backbone.layer1.0.bn1.BN.{n}": [32] for n in BN[:4]},
    "backbone.layer1.0.conv2.weight": [64, 64, 3, 3],
    "backbone.layer1.0.conv3.weight": [256, 64, 1, 1],
    **{f"backbone.layer1.0.bn3.{n}": [256] for n in BN[:4]},
    # SE: bias-free Linear(256 -> 256/16) and back, in Sequential slots 0 and 2
    "backbone.layer1.0.se.fc.0.weight": [16, 256],
    "backbone.layer1.0.se.fc.2.weight": [256, 16],
    "backbone.layer1.0.downsample.0.weight": [256, 64, 1, 1],
    **{f"backbone.layer1.0.downsample.1.{n}": [256] for n in BN[:4]},
    "backbone.layer3.5.conv3.weight": [1024, 256, 1, 1],
    "backbone.layer3.5.bn1.IN.weight": [128],  # IBN in every block of layers 1-3
    "backbone.layer4.0.bn1.weight": [512],  # ... but not in layer4
    "backbone.layer4.2.se.fc.2.weight": [2048, 128],  # SE also in layer4
    "backbone.layer4.2.conv3.weight": [2048, 512, 1, 1],
    # Non-local: inner width 1 (fast-reid's reduc_ratio // reduc_ratio), convs with bias, W = [conv, norm]
    "backbone.NL_2.0.g.weight": [1, 512, 1, 1],
    "backbone.NL_2.0.g.bias": [1],
    "backbone.NL_2.0.theta.weight": [1, 512, 1, 1],
    "backbone.NL_2.0.theta.bias": [1],
    "backbone.NL_2.0.phi.weight": [1, 512, 1, 1],
    "backbone.NL_2.0.phi.bias": [1],
    "backbone.NL_2.0.W.0.weight": [512, 1, 1, 1],
    "backbone.NL_2.0.W.0.bias": [512],
    **{f"backbone.NL_2.0.W.1.{n}": [512] for n in BN[:4]},
    "backbone.NL_2.1.g.weight": [1, 512, 1, 1],
    "backbone.NL_3.0.g.weight": [1, 1024, 1, 1],
    "backbone.NL_3.2.W.1.running_var": [1024],
    "heads.pool_layer.p": [1],
    "heads.bottleneck.0.weight": [256, 2048, 1, 1],  # 1x1 conv, bias-free
    **{f"heads.bottleneck.1.{n}": [256] for n in BN[:4]},
    "heads.bottleneck.1.num_batches_tracked": [],
}

ABSENT_R50_IBN_SE_NL = [
    "backbone.layer4.0.bn1.IN.weight", "backbone.layer4.0.bn1.BN.weight",
    "backbone.NL_1.0.g.weight", "backbone.NL_2.2.g.weight", "backbone.NL_3.3.g.weight", "backbone.NL_4.0.g.weight",
    "backbone.layer1.0.se.fc.0.bias", "heads.bottleneck.0.bias", "heads.bottleneck.2.weight",
    "heads.weight", "heads.classifier.weight", "pixel_mean", "pixel_std", "backbone.fc.weight",
]


def export_and_run(model: torch.nn.Module, x: torch.Tensor, run_batch: torch.Tensor | None = None) -> float:
    """Export with the exporter reidbuild uses; return max |onnxruntime - torch| relative to the output scale."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["features"], dynamic_axes={"images": {0: "n"}, "features": {0: "n"}})
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == 17
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    feed = x if run_batch is None else run_batch
    got = sess.run(None, {"images": feed.numpy()})[0]
    with torch.no_grad():
        want = model(feed).numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


# --------------------------------------------------------------------------- key layout


def test_r50_ibn_se_nl_key_layout_matches_fast_reid(make_cfg) -> None:
    from reidbuild.fastreid import build_model

    state = build_model(make_cfg("50x", **R50_IBN_SE_NL)).state_dict()
    for key, shape in EXPECTED_R50_IBN_SE_NL.items():
        assert key in state, key
        assert list(state[key].shape) == shape, (key, list(state[key].shape), shape)
    for key in ABSENT_R50_IBN_SE_NL:
        assert key not in state, key
    nl_blocks = sorted({".".join(k.split(".")[1:3]) for k in state if k.startswith("backbone.NL_")})
    assert nl_blocks == ["NL_2.0", "NL_2.1", "NL_3.0", "NL_3.1", "NL_3.2"]  # NL_LAYERS [0, 2, 3, 0]
    # fast-reid's state_dict for this config: 449 entries, 26 636 107 values (incl. heads.weight [751, 256])
    assert len(state) == 449 - 1
    assert sum(v.numel() for v in state.values()) == 26_636_107


@pytest.mark.parametrize("depth, opts, n_keys, n_values", [
    ("18x", {"MODEL.HEADS.WITH_BNNECK": True}, 126 - 1, 11_188_181),
    ("50x", {"MODEL.HEADS.WITH_BNNECK": True}, 324 - 1, 23_569_398),
    ("34x", {"MODEL.BACKBONE.WITH_IBN": True, "MODEL.BACKBONE.WITH_SE": True}, 275 - 1, 21_456_676),
    ("101x", {"MODEL.BACKBONE.WITH_IBN": True, "MODEL.BACKBONE.WITH_SE": True, "MODEL.BACKBONE.WITH_NL": True,
              "MODEL.HEADS.POOL_LAYER": "GeneralizedMeanPoolingP", "MODEL.HEADS.WITH_BNNECK": True}, 900 - 1, 47_442_582),
])
def test_state_dict_size_matches_fast_reid(make_cfg, depth, opts, n_keys, n_values) -> None:
    from reidbuild.fastreid import build_model

    state = build_model(make_cfg(depth, **opts)).state_dict()
    assert len(state) == n_keys
    assert sum(v.numel() for v in state.values()) == n_values


def test_resnet18_and_101_specific_keys(make_cfg) -> None:
    from reidbuild.fastreid import build_model

    r18 = build_model(make_cfg("18x", **{"MODEL.BACKBONE.WITH_NL": True})).state_dict()
    assert list(r18["backbone.layer1.0.conv1.weight"].shape) == [64, 64, 3, 3]  # BasicBlock
    assert "backbone.layer1.0.conv3.weight" not in r18
    assert "backbone.layer1.0.downsample.0.weight" not in r18  # 64 -> 64, stride 1
    assert list(r18["backbone.layer2.0.downsample.0.weight"].shape) == [128, 64, 1, 1]
    assert not any(k.startswith("backbone.NL_") for k in r18)  # NL_LAYERS [0, 0, 0, 0] for 18x
    r101 = build_model(make_cfg("101x", **{"MODEL.BACKBONE.WITH_NL": True})).state_dict()
    assert "backbone.layer3.22.conv3.weight" in r101 and "backbone.layer3.23.conv1.weight" not in r101
    assert "backbone.NL_3.8.phi.weight" in r101 and "backbone.NL_3.9.phi.weight" not in r101


@pytest.mark.parametrize("norm", ["syncBN", "GhostBN"])
def test_other_norms_use_batchnorm_keys(make_cfg, norm) -> None:
    from reidbuild.fastreid import build_model

    base = build_model(make_cfg("18x", **{"MODEL.HEADS.WITH_BNNECK": True})).state_dict()
    other = build_model(make_cfg("18x", **{"MODEL.BACKBONE.NORM": norm, "MODEL.HEADS.NORM": norm,
                                           "MODEL.HEADS.WITH_BNNECK": True})).state_dict()
    assert list(other) == list(base)
    assert all(other[k].shape == base[k].shape for k in base)


def test_pixel_normalisation_buffers(make_model) -> None:
    model = make_model("18x")
    assert model.pixel_mean.shape == (1, 3, 1, 1) and model.pixel_std.shape == (1, 3, 1, 1)
    assert model.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])
    assert model.pixel_std.flatten().tolist() == pytest.approx([58.395, 57.12, 57.375])
    assert "pixel_mean" in dict(model.named_buffers())


# --------------------------------------------------------------------------- forward semantics


def test_forward_normalises_pixels_then_runs_backbone_and_head(make_model, make_images) -> None:
    model = make_model("18x", **{"MODEL.HEADS.WITH_BNNECK": True})
    x = make_images()
    with torch.no_grad():
        want = model.heads(model.backbone((x - model.pixel_mean) / model.pixel_std))
        got = model(x)
    assert torch.equal(got, want)
    assert got.dtype == torch.float32 and got.shape == (2, 512)
    assert torch.equal(x, make_images())  # input not modified (fast-reid normalises in place)


def test_head_returns_bottleneck_output_at_inference_whatever_neck_feat(make_cfg, make_images) -> None:
    from reidbuild.fastreid import build_model, init_random

    x = make_images()
    outs = []
    for neck in ("before", "after"):
        model = build_model(make_cfg("18x", **{"MODEL.HEADS.WITH_BNNECK": True, "MODEL.HEADS.NECK_FEAT": neck}))
        init_random(model, 3)
        with torch.no_grad():
            outs.append(model(x))
            fmap = model.backbone((x - model.pixel_mean) / model.pixel_std)
            bn = model.heads.bottleneck[0]
            pooled = fmap.mean(dim=(2, 3))
            expected = (pooled - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        torch.testing.assert_close(outs[-1], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[0], outs[1])


def test_non_local_blocks_run_after_the_last_blocks_of_stages_2_and_3(make_model, make_images) -> None:
    model = make_model("50x", **{"MODEL.BACKBONE.WITH_NL": True})
    order: list[str] = []
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: order.append(name))
        for name, module in model.backbone.named_modules()
        if name.count(".") == 1 and (name.startswith("layer") or name.startswith("NL_"))
    ]
    with torch.no_grad():
        model(make_images(n=1))
    for hook in hooks:
        hook.remove()
    assert order == [
        "layer1.0", "layer1.1", "layer1.2",
        "layer2.0", "layer2.1", "layer2.2", "NL_2.0", "layer2.3", "NL_2.1",
        "layer3.0", "layer3.1", "layer3.2", "layer3.3", "NL_3.0", "layer3.4", "NL_3.1", "layer3.5", "NL_3.2",
        "layer4.0", "layer4.1", "layer4.2",
    ]


@pytest.mark.parametrize("last_stride, spatial", [(1, (4, 2)), (2, (2, 1))])
def test_last_stride_and_stem(make_model, make_images, last_stride, spatial) -> None:
    model = make_model("18x", **{"MODEL.BACKBONE.LAST_STRIDE": last_stride})
    with torch.no_grad():
        fmap = model.backbone(make_images())
        stem = model.backbone.maxpool(model.backbone.conv1(make_images()))
    assert tuple(fmap.shape[2:]) == spatial
    # 64x32 -> conv 32x16 -> 3x3/2 max-pool without padding, ceil_mode: 16x8
    assert tuple(stem.shape[2:]) == (16, 8)


# --------------------------------------------------------------------------- build, forward, export


@pytest.mark.parametrize("pool", POOLS)
def test_every_pool_layer_builds_runs_and_exports(make_model, make_images, pool) -> None:
    # no neck, so the model's output is the pooled feature itself; IBN/SE spread over the cases
    model = make_model("18x", **{"MODEL.HEADS.POOL_LAYER": pool,
                                 "MODEL.BACKBONE.WITH_IBN": pool in ("GlobalMaxPool", "Identity"),
                                 "MODEL.BACKBONE.WITH_SE": pool in ("AdaptiveAvgMaxPool", "Identity")})
    x = make_images()
    with torch.no_grad():
        fmap = model.backbone((x - model.pixel_mean) / model.pixel_std)
        got = model(x)
    assert got.shape == (2, 512) and bool(torch.isfinite(got).all())
    avg, mx = fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))

    def gem(p: float | torch.Tensor) -> torch.Tensor:
        return fmap.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)

    expected = {
        "Identity": lambda: fmap[:, :, 0, 0],  # fast-reid slices position (0, 0) when nothing pools
        "GlobalAvgPool": lambda: avg, "FastGlobalAvgPool": lambda: avg, "GlobalMaxPool": lambda: mx,
        "GeneralizedMeanPooling": lambda: gem(3.0),
        "GeneralizedMeanPoolingP": lambda: gem(model.heads.pool_layer.p),
        "AdaptiveAvgMaxPool": lambda: avg + mx, "ClipGlobalAvgPool": lambda: avg.clamp(0.0, 1.0),
    }[pool]()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if pool == "GeneralizedMeanPoolingP":
        assert model.heads.pool_layer.p.item() != 3.0  # the learned exponent is a real weight
    assert export_and_run(model, x) < 1e-4


def test_resnet50_ibn_se_nl_exports_with_dynamic_batch(make_model, make_images) -> None:
    model = make_model("50x", **R50_IBN_SE_NL)
    x = make_images()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 256) and bool(torch.isfinite(y).all())
    # exported at batch 2, run at batch 3: the graph must not bake the batch size in
    assert export_and_run(model, x, run_batch=make_images(n=3, seed=9)) < 1e-4


def test_resnet34_ibn_se_exports(make_model, make_images) -> None:
    model = make_model("34x", **{"MODEL.BACKBONE.WITH_IBN": True, "MODEL.BACKBONE.WITH_SE": True,
                                 "MODEL.HEADS.POOL_LAYER": "avgpool", "MODEL.HEADS.EMBEDDING_DIM": 128})
    x = make_images()
    assert export_and_run(model, x) < 1e-4


@pytest.mark.parametrize("depth, opts", [
    ("101x", {"MODEL.BACKBONE.WITH_IBN": True, "MODEL.BACKBONE.WITH_SE": True, "MODEL.BACKBONE.WITH_NL": True,
              "MODEL.HEADS.POOL_LAYER": "GeneralizedMeanPoolingP", "MODEL.HEADS.WITH_BNNECK": True}),
    ("50x", {"MODEL.BACKBONE.LAST_STRIDE": 2, "MODEL.HEADS.POOL_LAYER": "AdaptiveAvgMaxPool"}),
])
def test_deep_models_run_forward(make_model, make_images, depth, opts) -> None:
    model = make_model(depth, **opts)
    assert not model.training
    with torch.no_grad():
        y = model(make_images(n=2, h=64, w=32))
    assert y.shape == (2, 2048) and bool(torch.isfinite(y).all())
    assert 0.1 < float(y.abs().mean()) < 10.0  # seeded weights keep a deep net's features of order one
