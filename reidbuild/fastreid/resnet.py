"""fast-reid's ResNet backbone (``build_resnet_backbone``) for inference.

The module tree reproduces fast-reid's attribute names (``conv1``, ``bn1``, ``layer1``..
``layer4``, ``NL_1``..``NL_4``) so that its checkpoints load key for key.  Structure that
matters for parity: a 7x7 stem, a 3x3/2 max-pool *without* padding and with
``ceil_mode=True``, IBN-a only in layers 1-3, SE in every block when enabled, and
Non-local blocks after the last blocks of a stage.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .catalog import DEPTHS
from .layers import IBN, NonLocal, SELayer, make_norm

# fast-reid sizes the Non-local blocks for bottleneck widths regardless of block type.
_NL_CHANNELS = (256, 512, 1024, 2048)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, norm: str, with_ibn: bool, with_se: bool,
                 stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = IBN(planes, norm) if with_ibn else make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.relu = nn.ReLU(inplace=False)
        self.se = SELayer(planes) if with_se else nn.Identity()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck (ResNet-50/101)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, norm: str, with_ibn: bool, with_se: bool,
                 stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = IBN(planes, norm) if with_ibn else make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = make_norm(norm, width)
        self.relu = nn.ReLU(inplace=False)
        self.se = SELayer(width) if with_se else nn.Identity()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with fast-reid's options; returns the last feature map [N, FEAT_DIM, H/16, W/16]."""

    # the stages, registered by name in __init__ (state_dict order is fast-reid's)
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, depth: str, last_stride: int, norm: str, with_ibn: bool,
                 with_se: bool, with_nl: bool) -> None:
        super().__init__()
        spec = DEPTHS[depth]
        block: type[BasicBlock] | type[Bottleneck] = Bottleneck if spec.bottleneck else BasicBlock
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, 64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        strides = (1, 2, 2, last_stride)
        for index, (planes, count, stride) in enumerate(zip((64, 128, 256, 512), spec.blocks, strides)):
            # fast-reid leaves layer4 without IBN (IBN-a).
            ibn = with_ibn and index < 3
            self.add_module(f"layer{index + 1}", self._make_layer(block, planes, count, stride, norm, ibn, with_se))
        # Which block of each stage is followed by which Non-local block: the last
        # ``n`` blocks of a stage get one each, in order.
        self._nl_after: list[dict[int, int]] = [{} for _ in range(4)]
        if with_nl:
            for index, (count, n_nl, channels) in enumerate(zip(spec.blocks, spec.non_local, _NL_CHANNELS)):
                self.add_module(f"NL_{index + 1}", nn.ModuleList(NonLocal(channels, norm) for _ in range(n_nl)))
                self._nl_after[index] = {count - n_nl + k: k for k in range(n_nl)}

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, count: int,
                    stride: int, norm: str, with_ibn: bool, with_se: bool) -> nn.Sequential:
        width = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != width:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, width, kernel_size=1, stride=stride, bias=False),
                make_norm(norm, width),
            )
        blocks = [block(self.inplanes, planes, norm, with_ibn, with_se, stride, downsample)]
        self.inplanes = width
        blocks.extend(block(width, planes, norm, with_ibn, with_se) for _ in range(1, count))
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(4):
            layer: nn.Sequential = getattr(self, f"layer{stage + 1}")
            after = self._nl_after[stage]
            for index, blk in enumerate(layer):
                x = blk(x)
                if index in after:
                    x = getattr(self, f"NL_{stage + 1}")[after[index]](x)
        return x


def build(cfg: dict[str, Any]) -> ResNet:
    """The backbone a validated config's MODEL.BACKBONE describes."""
    bb = cfg["MODEL"]["BACKBONE"]
    return ResNet(depth=bb["DEPTH"], last_stride=bb["LAST_STRIDE"], norm=bb["NORM"],
                  with_ibn=bb["WITH_IBN"], with_se=bb["WITH_SE"], with_nl=bb["WITH_NL"])
