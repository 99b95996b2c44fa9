"""fast-reid's Vision Transformer backbone (``build_vit_backbone``) for inference.

As fast-reid builds it: width 768, 16x16 patches taken every STRIDE_SIZE pixels (``patch_embed.proj``),
a class token, a learned position embedding for the INPUT.SIZE_TRAIN grid (a trained checkpoint holds it
at that size, so nothing is interpolated at deployment; fast-reid resizes it only when it loads ImageNet
weights for training), pre-norm blocks (LayerNorm eps 1e-6, multi-head attention, GELU MLP) and a final
``norm``. It returns the class token as a [N, 768, 1, 1] map, which the head takes with POOL_LAYER Identity.
fast-reid's builder never enables side-information embedding (SIE), so there is no camera input.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .catalog import VIT_DEPTHS, ViTSpec
from .config import PATCH

WIDTH = 768
LN_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` is one Linear producing queries, keys and values."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.heads = spec.heads
        self.scale = spec.qk_scale if spec.qk_scale is not None else (WIDTH // spec.heads) ** -0.5
        self.qkv = nn.Linear(WIDTH, WIDTH * 3, bias=spec.qkv_bias)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, width = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(n, tokens, width))


class Mlp(nn.Module):
    """Linear -> GELU (exact, erf) -> Linear."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with two residual branches."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH, eps=LN_EPS)
        self.attn = Attention(spec)
        self.norm2 = nn.LayerNorm(WIDTH, eps=LN_EPS)
        self.mlp = Mlp(int(WIDTH * spec.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """fast-reid's ``PatchEmbed_overlap``: a 16x16 convolution with stride STRIDE_SIZE, flattened to tokens."""

    def __init__(self, size: tuple[int, int], stride: tuple[int, int]) -> None:
        super().__init__()
        self.rows = (size[0] - PATCH) // stride[0] + 1
        self.cols = (size[1] - PATCH) // stride[1] + 1
        self.proj = nn.Conv2d(3, WIDTH, PATCH, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Images normalised by the meta-architecture -> class-token feature [N, 768, 1, 1]."""

    def __init__(self, depth: str, size: tuple[int, int], stride: tuple[int, int]) -> None:
        super().__init__()
        spec = VIT_DEPTHS[depth]
        self.patch_embed = PatchEmbed(size, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.rows * self.patch_embed.cols + 1, WIDTH))
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.blocks))
        self.norm = nn.LayerNorm(WIDTH, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0].reshape(x.shape[0], WIDTH, 1, 1)


def build(cfg: dict[str, Any]) -> VisionTransformer:
    """The ViT for a validated config: DEPTH picks the size, INPUT.SIZE_TRAIN and STRIDE_SIZE the patch grid."""
    bb = cfg["MODEL"]["BACKBONE"]
    size = cfg["INPUT"]["SIZE_TRAIN"]
    stride = bb["STRIDE_SIZE"]
    return VisionTransformer(bb["DEPTH"], (size[0], size[1]), (stride[0], stride[1]))
