"""Every layer mapping, on tiny torch nets, against PyTorch through both real Caffe runtimes and both dialects.

Tolerance: rtol=1e-5, atol=2e-6 on activations of magnitude <= 3. Caffe (im2col + BLAS gemm, its own pooling
and normalisation loops) and OpenCV (which also fuses BatchNorm/Scale into convolutions) sum in a different
order than PyTorch, which moves float32 results by a few ulp: measured max abs diff <= 5e-7 over all cases,
dialects and runtimes. The bound leaves ~4x headroom (other CPUs/BLAS kernels) and is still orders of
magnitude below what any structural error (a wrong window, eps on the std instead of the variance, a
shifted row) produces.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from tests.caffe._util import DIALECTS, RUNTIMES, export, need, rand, run_caffe, torch_ref, write_caffe

RTOL, ATOL = 1e-5, 2e-6


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (defaults would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module.eval()


class Convs(nn.Module):
    """Grouped + biased, dilated + bias-free, and a rectangular kernel with unequal stride/padding."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=True)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.c = nn.Conv2d(8, 6, (1, 3), stride=(2, 1), padding=(0, 1), bias=True)
        self.d = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)  # depthwise

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x))))


class BatchNorms(nn.Module):
    """BatchNorm the exporter cannot fold (after a ReLU, on [N,D,1,1] like the BNNeck, on [N,D])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.neck = nn.BatchNorm2d(6)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.bn(torch.relu(self.conv(x)))
        y = self.neck(nn.functional.adaptive_avg_pool2d(y, 1))
        return self.bn1d(y.flatten(1))


class Activations(nn.Module):
    def forward(self, x):
        return torch.cat([torch.relu(x), nn.functional.leaky_relu(x, 0.1), torch.sigmoid(x), torch.tanh(x),
                          x.clamp(min=-0.25, max=0.5), x.clamp(min=0.0), torch.abs(x) + 1e-3], 1)


class Pools(nn.Module):
    """Max and average pooling (padded, floor and ceil rounding) and the two global poolings."""

    def __init__(self) -> None:
        super().__init__()
        self.mp = nn.MaxPool2d(3, 2, 1)
        self.mp_ceil = nn.MaxPool2d(3, 2, 0, ceil_mode=True)
        self.ap = nn.AvgPool2d(3, 2, 1)  # count_include_pad=True, like Caffe
        self.ap2 = nn.AvgPool2d(2, 2)

    def forward(self, x):
        g = torch.cat([nn.functional.adaptive_avg_pool2d(x, 1), nn.functional.adaptive_max_pool2d(x, 1),
                       x.mean(dim=(2, 3), keepdim=True)], 1)
        return torch.cat([self.mp(x).flatten(1), self.mp_ceil(x).flatten(1), self.ap(x).flatten(1),
                          self.ap2(x).flatten(1), g.flatten(1)], 1)


class Eltwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return torch.cat([a + b, a * b, a - b, a / (b.abs() + 1.0)], 1)


class InnerProducts(nn.Module):
    """Linear with and without bias (Gemm and MatMul in ONNX), and a Linear on a 3-D tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4 * 5 * 3, 16)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.tok = nn.Linear(3, 5)

    def forward(self, x):
        y = self.fc2(torch.relu(self.fc1(x.flatten(1))))
        t = self.tok(x.reshape(x.shape[0], 4 * 5, 3))
        return torch.cat([y, t.flatten(1)], 1)


class Reshapes(nn.Module):
    """flatten, view(N, -1), [N, C, HW], unsqueeze/squeeze, transposes that only move unit axes, indexing."""

    def forward(self, x):
        n = x.shape[0]
        a = x.view(n, -1)
        b = (x.reshape(n, x.shape[1], -1).unsqueeze(-1) * 2.0).squeeze(-1).flatten(1)
        p = nn.functional.adaptive_avg_pool2d(x, 1)
        c = p.transpose(1, 2).transpose(1, 2)[:, :, 0, 0]
        d = x[:, 1:3, 2:4]
        return torch.cat([a, b, c, d.flatten(1)], 1)


class InputNorm(nn.Module):
    """fast-reid's input normalisation: (x - pixel_mean) / pixel_std with [1,3,1,1] constants."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(1, -1, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)

    def forward(self, x):
        return self.conv((x - self.pixel_mean) / self.pixel_std)


class IBNSplit(nn.Module):
    """IBN-a with torch.split (ONNX Split) instead of slicing, half InstanceNorm half BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.IN = nn.InstanceNorm2d(3, affine=True)
        self.BN = nn.BatchNorm2d(5)

    def forward(self, x):
        a, b = torch.split(x, [3, 5], 1)
        return torch.cat((self.IN(a.contiguous()), self.BN(b.contiguous())), 1)


class Misc(nn.Module):
    """Scalar constants (Power), division by constants, softmax, exp/log, sqrt."""

    def forward(self, x):
        y = x * 0.5 + 2.0
        z = torch.softmax(x, dim=1)
        w = torch.exp(x * 0.1)
        v = torch.log(x.abs() + 1.0)
        return torch.cat([y, 3.0 - y, y / 4.0, 1.0 / (x.abs() + 1), z, w, v, torch.sqrt(x.abs() + 0.1)], 1)


def _fastreid(name: str) -> nn.Module:
    from reidbuild.fastreid import layers as L

    return {"ibn": lambda: L.IBN(8, "BN"), "se": lambda: L.SELayer(32, reduction=4),
            "nonlocal": lambda: L.NonLocal(8, "BN"), "gem": L.GeneralizedMeanPooling,
            "gemp": L.GeneralizedMeanPoolingP}[name]()


def _nonlocal_nontrivial(m: nn.Module) -> nn.Module:
    # fast-reid zero-initialises W's BatchNorm (the block starts as identity): make it contribute
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return _randomize(m)


# name -> (module factory, input shape, input range, Caffe layer types the mapping must use)
CASES = {
    "conv": (Convs, (2, 4, 11, 9), (-1, 1), {"Convolution"}),
    "batchnorm": (BatchNorms, (2, 4, 7, 5), (-1, 1), {"BatchNorm", "Scale"}),
    "activations": (Activations, (2, 3, 5, 4), (-1, 1), {"ReLU", "Sigmoid", "TanH", "AbsVal", "Power"}),
    "pooling": (Pools, (2, 3, 9, 8), (-1, 1), {"Pooling"}),
    "eltwise": (Eltwise, (2, 4, 6, 5), (-1, 1), {"Eltwise"}),
    "inner_product": (InnerProducts, (2, 4, 5, 3), (-1, 1), {"InnerProduct"}),
    "reshape": (Reshapes, (2, 4, 5, 3), (-1, 1), {"Flatten", "Reshape", "Slice"}),
    "input_norm": (InputNorm, (2, 3, 8, 6), (0, 255), {"Scale"}),
    "ibn_slice": (lambda: _fastreid("ibn"), (2, 8, 6, 5), (-1, 1), {"MVN", "BatchNorm", "Concat", "Slice"}),
    "ibn_split": (IBNSplit, (2, 8, 6, 5), (-1, 1), {"MVN", "BatchNorm", "Concat", "Slice"}),
    "se": (lambda: _fastreid("se"), (2, 32, 5, 4), (-1, 1), {"Sigmoid", "Scale", "InnerProduct"}),
    "nonlocal": (lambda: _nonlocal_nontrivial(_fastreid("nonlocal")), (2, 8, 6, 4), (-1, 1),
                 {"Eltwise", "InnerProduct", "Scale"}),
    "gem": (lambda: _fastreid("gem"), (2, 5, 6, 4), (-1, 1), {"Power", "ReLU", "Pooling"}),
    "gemp": (lambda: _fastreid("gemp"), (2, 5, 6, 4), (-1, 1), {"Power", "ReLU", "Pooling"}),
    "misc": (Misc, (2, 3, 4, 4), (-2, 2), {"Power", "Softmax", "Exp", "Log"}),
}


@functools.lru_cache(maxsize=None)
def _case(name: str):
    make, shape, (lo, hi), types = CASES[name]
    torch.manual_seed(0)
    module = make()
    if name != "nonlocal":
        _randomize(module)
    x = rand(shape, seed=1, low=lo, high=hi)
    return export(module, shape), x, torch_ref(module, x).reshape(shape[0], -1), types


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_mapping_matches_pytorch(case, dialect, runtime, tmp_path):
    need(runtime)
    model, x, ref, types = _case(case)
    proto, caffemodel, text = write_caffe(tmp_path, model, dialect, x.shape)
    used = set(line.split('"')[1] for line in text.splitlines() if line.strip().startswith("type:"))
    assert types <= used, f"expected layer types {sorted(types - used)} in the prototxt"
    out = run_caffe(proto, caffemodel, runtime, x, dialect)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
