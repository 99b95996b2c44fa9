"""fast-reid's ResNeSt backbone (``build_resnest_backbone``) for inference.

What fast-reid builds for every depth: radix-2 split attention with one cardinal group, a deep stem
(three 3x3 convolutions, ``conv1.0/.3/.6``), average-pooling downsampling (``downsample.0`` is an
AvgPool2d), and the stride moved out of the 3x3 convolution into an ``avd_layer`` (3x3 average pool)
on the first block of layers 2-4.  LAST_STRIDE=1 keeps layer4 at stride 1 and dilates all but its
first block by 2.  fast-reid's builder reads no IBN/SE/non-local switch for ResNeSt, so neither does this.

The split attention is written for export to both ONNX and stock Caffe: split by channel slices, a
softmax over the radix axis of a [N, radix, C] view, and a sum of per-channel scalings.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .catalog import RESNEST_DEPTHS
from .layers import make_norm

RADIX = 2
BOTTLENECK_WIDTH = 64
EXPANSION = 4
REDUCTION = 4  # split-attention inner width: max(in * radix // 4, 32)


class SplitAttention(nn.Module):
    """Split-attention 3x3 convolution (fast-reid's ``SplAtConv2d`` with groups=1, radix 2, BN).

    Keys: ``conv`` (grouped by radix), ``bn0``, ``fc1`` (with bias), ``bn1``, ``fc2`` (with bias).
    """

    def __init__(self, channels: int, stride: int, dilation: int, norm: str) -> None:
        super().__init__()
        inter = max(channels * RADIX // REDUCTION, 32)
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels * RADIX, 3, stride, padding=dilation, dilation=dilation,
                              groups=RADIX, bias=False)
        self.bn0 = make_norm(norm, channels * RADIX)
        self.relu = nn.ReLU(inplace=False)
        self.fc1 = nn.Conv2d(channels, inter, 1)
        self.bn1 = make_norm(norm, inter)
        self.fc2 = nn.Conv2d(inter, channels * RADIX, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.conv(x)))
        splits = torch.split(x, self.channels, dim=1)
        gap = splits[0]
        for part in splits[1:]:
            gap = gap + part
        gap = gap.mean(dim=(2, 3), keepdim=True)
        logits = self.fc2(self.relu(self.bn1(self.fc1(gap))))
        # radix-major channel order: weights[:, r] scales split r, softmax across r per channel
        weights = torch.softmax(logits.reshape(x.shape[0], RADIX, self.channels), dim=1)
        out = splits[0] * weights[:, 0].reshape(x.shape[0], self.channels, 1, 1)
        for r in range(1, RADIX):
            out = out + splits[r] * weights[:, r].reshape(x.shape[0], self.channels, 1, 1)
        return out


class Bottleneck(nn.Module):
    """1x1 -> split attention 3x3 -> [avd 3x3 average pool] -> 1x1, residual through ``downsample``."""

    def __init__(self, inplanes: int, planes: int, norm: str, stride: int, dilation: int, avd: bool,
                 downsample: nn.Module | None) -> None:
        super().__init__()
        width = int(planes * (BOTTLENECK_WIDTH / 64.0))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = make_norm(norm, width)
        if avd:  # the block's stride (or 1 on layer4 at LAST_STRIDE 1) moves into an average pool
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
            stride = 1
        self.avd = avd
        self.conv2 = SplitAttention(width, stride, dilation, norm)
        self.conv3 = nn.Conv2d(width, planes * EXPANSION, 1, bias=False)
        self.bn3 = make_norm(norm, planes * EXPANSION)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.bn1(self.conv1(x))))
        if self.avd:
            out = self.avd_layer(out)
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNeSt(nn.Module):
    """ResNeSt-50/101/200/269 as fast-reid configures it; returns [N, 2048, H/16, W/16] (LAST_STRIDE 1)."""

    # the stages, registered by name in __init__ (state_dict order is fast-reid's)
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, depth: str, last_stride: int, norm: str) -> None:
        super().__init__()
        spec = RESNEST_DEPTHS[depth]
        stem = spec.stem_width
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem, 3, 2, 1, bias=False), make_norm(norm, stem), nn.ReLU(inplace=False),
            nn.Conv2d(stem, stem, 3, 1, 1, bias=False), make_norm(norm, stem), nn.ReLU(inplace=False),
            nn.Conv2d(stem, stem * 2, 3, 1, 1, bias=False),
        )
        self.bn1 = make_norm(norm, stem * 2)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.inplanes = stem * 2
        # (planes, stride, dilation of blocks after the first, whether the first block gets avd)
        layer4 = (512, 1, 2) if last_stride == 1 else (512, 2, 1)
        plan = ((64, 1, 1, False), (128, 2, 1, True), (256, 2, 1, True), (*layer4, True))
        for index, ((planes, stride, dilation, avd), count) in enumerate(zip(plan, spec.blocks)):
            self.add_module(f"layer{index + 1}", self._make_layer(planes, count, stride, dilation, avd, norm))

    def _make_layer(self, planes: int, count: int, stride: int, dilation: int, first_avd: bool,
                    norm: str) -> nn.Sequential:
        width = planes * EXPANSION
        downsample = None
        if stride != 1 or self.inplanes != width:
            downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(self.inplanes, width, 1, bias=False),
                make_norm(norm, width),
            )
        # fast-reid gives the first block dilation 1 and avd when it strides or opens layers 2-4
        blocks = [Bottleneck(self.inplanes, planes, norm, stride, 1, first_avd, downsample)]
        self.inplanes = width
        blocks.extend(Bottleneck(width, planes, norm, 1, dilation, False, None) for _ in range(1, count))
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build(cfg: dict[str, Any]) -> ResNeSt:
    """The backbone a validated config's MODEL.BACKBONE describes."""
    bb = cfg["MODEL"]["BACKBONE"]
    return ResNeSt(depth=bb["DEPTH"], last_stride=bb["LAST_STRIDE"], norm=bb["NORM"])
