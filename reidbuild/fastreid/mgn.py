"""fast-reid's MGN (Multiple Granularity Network) meta-architecture for inference.

Module tree as fast-reid's ``MGN.from_config`` assembles it, so checkpoints load key for key:
``backbone`` is a Sequential of the ResNet stem, layer1, layer2 and the first block of layer3; three
branches ``b1``..``b3`` each continue with the rest of layer3 and a layer4 (``b1``: the backbone's own
layer4, honouring LAST_STRIDE; ``b2``/``b3``: three stride-1 bottlenecks without IBN); eight
EmbeddingHeads pool the whole maps and their horizontal stripes (``torch.chunk`` on height: 2 stripes
for ``b2``, 3 for ``b3``). The eval output is fast-reid's: the eight head outputs concatenated in the
order b1, b2, b3, b21, b22, b31, b32, b33.  Non-local blocks are never part of fast-reid's MGN.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import head
from .catalog import MGN_PARTS
from .layers import make_norm
from .resnet import Bottleneck, ResNet

# heads in the order fast-reid concatenates their outputs
HEADS: tuple[str, ...] = ("b1_head", "b2_head", "b3_head", "b21_head", "b22_head", "b31_head", "b32_head", "b33_head")


def _part_conv5(norm: str, with_se: bool) -> nn.Sequential:
    """The part branches' layer4: stride 1 (the stripes need rows), no IBN, as fast-reid builds it."""
    downsample = nn.Sequential(nn.Conv2d(1024, 2048, 1, bias=False), make_norm(norm, 2048))
    return nn.Sequential(Bottleneck(1024, 512, norm, False, with_se, 1, downsample),
                         Bottleneck(2048, 512, norm, False, with_se),
                         Bottleneck(2048, 512, norm, False, with_se))


class MGN(nn.Module):
    """float32 [N, 3, H, W] RGB 0..255 -> float32 [N, 8 * D] (D: one head's width)."""

    pixel_mean: torch.Tensor  # buffers registered in __init__
    pixel_std: torch.Tensor
    b1: nn.Sequential  # the branches, registered in fast-reid's order in __init__
    b2: nn.Sequential
    b3: nn.Sequential

    def __init__(self, resnet: ResNet, make_head: Callable[[], nn.Module], norm: str, with_se: bool,
                 pixel_mean: list[float], pixel_std: list[float], num_classes: int = 0) -> None:
        super().__init__()
        self.backbone = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                      resnet.layer1, resnet.layer2, resnet.layer3[0])
        conv4 = nn.Sequential(*list(resnet.layer3)[1:])
        conv5 = {"b1": resnet.layer4, "b2": _part_conv5(norm, with_se), "b3": _part_conv5(norm, with_se)}
        for branch in ("b1", "b2", "b3"):  # registration order = fast-reid's state_dict order
            self.add_module(branch, nn.Sequential(copy.deepcopy(conv4), conv5[branch]))
            for name in (h for h in HEADS if h.startswith(branch)):
                self.add_module(name, make_head())
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.num_classes = num_classes

    @property
    def feature_dim(self) -> int:
        """Length of the concatenated feature."""
        return sum(getattr(self, name).out_dim for name in HEADS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shared = self.backbone((images - self.pixel_mean) / self.pixel_std)
        maps = {"b1": self.b1(shared), "b2": self.b2(shared), "b3": self.b3(shared)}
        for branch, parts in zip(("b2", "b3"), MGN_PARTS):
            stripes = torch.chunk(maps[branch], parts, dim=2)
            if len(stripes) != parts:  # plan-time check_input_size refuses such heights first
                raise ValueError(f"a {maps[branch].shape[2]}-row map cannot be cut into {parts} stripes")
            maps.update({f"{branch}{i + 1}": stripe for i, stripe in enumerate(stripes)})
        return torch.cat([getattr(self, name)(maps[name[:-len("_head")]]) for name in HEADS], dim=1)


def build(cfg: dict[str, Any], build_backbone: Callable[[dict[str, Any]], nn.Module]) -> MGN:
    """MGN over a ResNet without non-local blocks (fast-reid's MGN takes only the ResNet's stages)."""
    model_cfg = cfg["MODEL"]
    bb = model_cfg["BACKBONE"]
    plain = copy.deepcopy(cfg)
    plain["MODEL"]["BACKBONE"]["WITH_NL"] = False
    resnet = build_backbone(plain)
    if not isinstance(resnet, ResNet):  # the config check admits only ResNet backbones for MGN
        raise TypeError(f"MGN needs a ResNet backbone, got {type(resnet).__name__}")
    return MGN(resnet, lambda: head.build(cfg), bb["NORM"], bb["WITH_SE"], model_cfg["PIXEL_MEAN"],
               model_cfg["PIXEL_STD"], model_cfg["HEADS"]["NUM_CLASSES"])
