"""The fast-reid blocks against their definitions, written independently with einsum/explicit maths."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from reidbuild.fastreid.layers import IBN, NonLocal, SELayer


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
    module.eval()


def _bn(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + 1e-5) * bn.weight.view(
        shape) + bn.bias.view(shape)


def test_non_local_is_dot_product_attention_with_width_one() -> None:
    block = NonLocal(24, "BN")
    _randomise(block, 0)
    x = torch.randn(2, 24, 5, 3, generator=torch.Generator().manual_seed(1))

    def proj(conv: torch.nn.Conv2d) -> torch.Tensor:  # [N, HW]
        return torch.einsum("nchw,c->nhw", x, conv.weight[0, :, 0, 0]).flatten(1) + conv.bias[0]

    theta, phi, g = proj(block.theta), proj(block.phi), proj(block.g)
    n_pos = theta.shape[1]
    y = torch.einsum("ni,nj,nj->ni", theta, phi, g) / n_pos  # sum_j theta_i phi_j g_j / N
    y = y.view(2, 1, 5, 3)
    w_conv = block.W[0]
    wy = torch.einsum("nkhw,ck->nchw", y, w_conv.weight[:, :, 0, 0]) + w_conv.bias.view(1, -1, 1, 1)
    expected = _bn(wy, block.W[1]) + x
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_se_layer_gates_channels() -> None:
    layer = SELayer(32)
    _randomise(layer, 2)
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(3))
    squeeze = x.mean(dim=(2, 3))
    hidden = F.relu(squeeze @ layer.fc[0].weight.T)
    gate = torch.sigmoid(hidden @ layer.fc[2].weight.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x * gate[:, :, None, None], rtol=1e-5, atol=1e-6)
    assert layer.fc[0].weight.shape == (2, 32)  # int(32 / 16)


@pytest.mark.parametrize("planes", [64, 7])
def test_ibn_normalises_first_half_per_instance_and_the_rest_with_running_stats(planes: int) -> None:
    ibn = IBN(planes, "BN")
    _randomise(ibn, 4)
    half = planes // 2
    assert ibn.IN.weight.shape == (half,) and ibn.BN.weight.shape == (planes - half,)
    x = torch.randn(3, planes, 6, 4, generator=torch.Generator().manual_seed(5)) * 3 + 1
    first = x[:, :half]
    mean = first.mean(dim=(2, 3), keepdim=True)
    var = first.var(dim=(2, 3), keepdim=True, unbiased=False)
    inst = (first - mean) / torch.sqrt(var + 1e-5) * ibn.IN.weight.view(1, -1, 1, 1) + ibn.IN.bias.view(1, -1, 1, 1)
    expected = torch.cat([inst, _bn(x[:, half:], ibn.BN)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(ibn(x), expected, rtol=1e-4, atol=1e-5)
