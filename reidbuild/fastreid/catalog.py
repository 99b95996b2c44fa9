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
