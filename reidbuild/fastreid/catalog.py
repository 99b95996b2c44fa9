"""What reidbuild's fast-reid support covers, as plain data (no torch), so configs validate without it."""
from __future__ import annotations

from dataclasses import dataclass

BN_NORMS: tuple[str, ...] = ("BN", "syncBN", "GhostBN")

POOL_NAMES: tuple[str, ...] = ("Identity", "GlobalAvgPool", "GlobalMaxPool", "FastGlobalAvgPool",
                               "GeneralizedMeanPooling", "GeneralizedMeanPoolingP", "AdaptiveAvgMaxPool",
                               "ClipGlobalAvgPool")

# fast-reid v0.3-v1.0 spelled the pooling layers in lower case; their checkpoints use the
# same parameter names as today's classes, so the old spellings are plain aliases.
LEGACY_POOL_NAMES: dict[str, str] = {
    "identity": "Identity",
    "avgpool": "GlobalAvgPool",
    "maxpool": "GlobalMaxPool",
    "fastavgpool": "FastGlobalAvgPool",
    "gempool": "GeneralizedMeanPooling",
    "gempoolP": "GeneralizedMeanPoolingP",
    "avgmaxpool": "AdaptiveAvgMaxPool",
    "clipavgpool": "ClipGlobalAvgPool",
}


@dataclass(frozen=True)
class DepthSpec:
    """Per-depth layout facts from fast-reid's build_resnet_backbone."""

    blocks: tuple[int, int, int, int]
    non_local: tuple[int, int, int, int]
    bottleneck: bool

    @property
    def feat_dim(self) -> int:
        return 512 * (4 if self.bottleneck else 1)


DEPTHS: dict[str, DepthSpec] = {
    "18x": DepthSpec((2, 2, 2, 2), (0, 0, 0, 0), bottleneck=False),
    "34x": DepthSpec((3, 4, 6, 3), (0, 0, 0, 0), bottleneck=False),
    "50x": DepthSpec((3, 4, 6, 3), (0, 2, 3, 0), bottleneck=True),
    "101x": DepthSpec((3, 4, 23, 3), (0, 2, 9, 0), bottleneck=True),
}


# --------------------------------------------------------------------------- the architecture registry
# The one place that says which fast-reid architectures reidbuild builds. A new backbone or
# meta-architecture is a module in this package with a ``build(cfg)`` function, registered here by
# name (plain data, so configs validate without importing torch).


@dataclass(frozen=True)
class BackboneSpec:
    """A fast-reid backbone builder reidbuild reproduces: its module, depths (-> output width) and the
    MODEL.BACKBONE switches fast-reid's builder reads (the others it ignores, and so does reidbuild)."""

    module: str
    feat_dims: dict[str, int]
    honours: tuple[str, ...]


BACKBONES: dict[str, BackboneSpec] = {
    "build_resnet_backbone": BackboneSpec(
        "resnet", {depth: spec.feat_dim for depth, spec in DEPTHS.items()}, ("WITH_IBN", "WITH_SE", "WITH_NL")),
    # fast-reid's ResNeSt builder takes only DEPTH, LAST_STRIDE and NORM; IBN/SE/NL switches are not read.
    "build_resnest_backbone": BackboneSpec("resnest", {"50x": 2048, "101x": 2048, "200x": 2048, "269x": 2048}, ()),
    # ViT: DEPTH names a size; the width is 768 for both; the patch grid comes from INPUT.SIZE_TRAIN.
    "build_vit_backbone": BackboneSpec("vit", {"small": 768, "base": 768}, ()),
}

# Meta-architecture name -> the module whose ``build(cfg, backbone_builder)`` makes the model.
META_ARCHITECTURES: dict[str, str] = {"Baseline": "baseline", "MGN": "mgn"}

# Backbones fast-reid 1.4 registers that reidbuild does not reproduce (refused by name).
UNSUPPORTED_BACKBONES: tuple[str, ...] = (
    "build_osnet_backbone", "build_mobilenetv2_backbone", "build_mobilenetv3_backbone", "build_regnet_backbone",
    "build_effnet_backbone", "build_repvgg_backbone", "build_resnext_backbone", "build_shufflenetv2_backbone",
)


@dataclass(frozen=True)
class ResNeStSpec:
    """fast-reid's build_resnest_backbone per depth: blocks per stage and the deep stem's width."""

    blocks: tuple[int, int, int, int]
    stem_width: int


RESNEST_DEPTHS: dict[str, ResNeStSpec] = {
    "50x": ResNeStSpec((3, 4, 6, 3), 32),
    "101x": ResNeStSpec((3, 4, 23, 3), 64),
    "200x": ResNeStSpec((3, 24, 36, 3), 64),
    "269x": ResNeStSpec((3, 30, 48, 8), 64),
}


@dataclass(frozen=True)
class ViTSpec:
    """fast-reid's build_vit_backbone per DEPTH (embedding width is always 768, patches 16x16)."""

    blocks: int
    heads: int
    mlp_ratio: float
    qkv_bias: bool
    qk_scale: float | None  # None: head_dim ** -0.5


VIT_DEPTHS: dict[str, ViTSpec] = {
    "small": ViTSpec(8, 8, 3.0, False, 768 ** -0.5),
    "base": ViTSpec(12, 12, 4.0, True, None),
}

# MGN splits its part branches into this many horizontal stripes (fast-reid's torch.chunk on height).
MGN_PARTS: tuple[int, ...] = (2, 3)
