"""Helpers for graph patch tests: a tiny torch->ONNX model and a tiny Caffe net (+ weights)."""
from __future__ import annotations

import io
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

INPUT = (1, 3, 16, 8)


def tiny_onnx(dynamic: bool) -> bytes:
    import torch
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn(self.conv(x / 255.0))))
            return self.fc(self.flat(self.gap(x)))

    torch.manual_seed(0)
    m = Tiny().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.1, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.zeros(*INPUT),), buf, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None)
    return buf.getvalue()


def run_onnx(data: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def images(n: int = 3, seed: int = 0) -> np.ndarray:
    """Integral float32 RGB NCHW 0..255, like images.load_images gives."""
    return np.random.default_rng(seed).integers(0, 256, (n,) + INPUT[1:]).astype(np.float32)


def write_patch(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return p


# ------------------------------------------------------------------------------------------- Caffe

CAFFE_NET = """\
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 %s} }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "relu2" type: "ReLU" bottom: "fc" top: "fc" }
"""


def caffe_net(ceil_mode: str = "") -> str:
    """The tiny net; ``ceil_mode='ceil_mode: false '`` gives floor pooling in the ceil_mode dialect."""
    return CAFFE_NET % ceil_mode


def caffe_weights(dialect: str, fc_in: int = 4 * 8 * 4, seed: int = 0) -> bytes:
    """A weights-only caffemodel (name + blobs per layer) for :func:`caffe_net`."""
    from reidbuild.caffe import schema as S

    rng = np.random.default_rng(seed)
    w = S.new_net(dialect)
    for name, shapes in (("conv1", [(4, 3, 3, 3), (4,)]), ("fc", [(5, fc_in), (5,)])):
        la = w.layer.add(name=name)
        for sh in shapes:
            S.fill_blob(la.blobs.add(), rng.standard_normal(sh) * 0.1)
    return S.net_to_binary(w)


REIDBUILD_STYLE_NET = """\
name: "tiny_reid"
layer { name: "input" type: "Input" top: "input" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "input" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "maxpool" type: "Pooling" bottom: "conv1" top: "maxpool"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 %s} }
layer { name: "conv2" type: "Convolution" bottom: "maxpool" top: "conv2"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "gap" type: "Pooling" bottom: "conv2" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "bnneck" type: "BatchNorm" bottom: "gap" top: "bnneck" }
layer { name: "bnneck_scale" type: "Scale" bottom: "bnneck" top: "bnneck" scale_param { bias_term: true } }
layer { name: "flatten" type: "Flatten" bottom: "bnneck" top: "output" }
"""


def reid_net(dialect: str) -> tuple[str, bytes]:
    """A net shaped like reidbuild's converter output for fast-reid (stem max-pool rounding down, global
    pooling + BN neck head, output blob "output"), with weights."""
    from reidbuild.caffe import schema as S

    text = REIDBUILD_STYLE_NET % ("ceil_mode: false " if dialect == "ceil_mode" else "")
    rng = np.random.default_rng(3)
    w = S.new_net(dialect)
    for name, shapes in (("conv1", [(4, 3, 3, 3), (4,)]), ("conv2", [(6, 4, 3, 3), (6,)]),
                         ("bnneck", [(6,), (6,), (1,)]), ("bnneck_scale", [(6,), (6,)])):
        la = w.layer.add(name=name)
        for sh in shapes:
            arr = rng.standard_normal(sh) * 0.1
            if name == "bnneck":
                arr = np.abs(arr) + (0.5 if sh == (6,) else 1.0)
            S.fill_blob(la.blobs.add(), arr)
    return text, S.net_to_binary(w)


def pycaffe():
    """The real Caffe Python module, or skip (it is built by scripts/build_pycaffe.sh)."""
    import os

    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe  # type: ignore
    except Exception:  # noqa: BLE001 - a broken pycaffe install fails in any way
        pytest.skip("pycaffe is not installed (scripts/build_pycaffe.sh builds it)")
    return caffe


def caffe_forward(proto: Path, model: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    caffe = pycaffe()
    net = caffe.Net(str(proto), caffe.TEST, weights=str(model))
    net.blobs[net.inputs[0]].data[...] = x
    return {k: v.copy() for k, v in net.forward().items()}
