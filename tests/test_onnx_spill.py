"""The export's weight spill (``reidbuild.stages.spill``): the PyTorch model's weights wait in a scratch file
while torch's exporter serialises, and stay there until a stage asks for the model again. The ONNX bytes and
the model must be exactly those of an export without it, and the spill must really free the weights."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reidbuild import heap
from reidbuild.errors import StageFailed
from reidbuild.pipeline import StageContext
from reidbuild.stages.load import model_from, park_model, release_model
from reidbuild.stages.onnx import export_onnx, export_spilled
from reidbuild.stages.spill import MIN_SPILL_BYTES, exporter_hook
from reidbuild.testing import make_trained_like, person_like_images
from tests.helpers import REPO, tiny_manifest, tiny_model

H, W = 64, 32


@pytest.fixture()
def model(tmp_path):
    tiny_manifest(tmp_path / "proj")
    m = tiny_model(tmp_path / "proj", seed=1)
    return make_trained_like(m, person_like_images(16, H, W, seed=1), seed=0)


def _name(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_installed_torch_has_the_hook_point():
    """Without it every export runs unspilled (same bytes, one model's size more at the peak): a torch
    upgrade that removes it must be noticed here."""
    assert exporter_hook() is not None


def test_spilled_export_writes_the_same_bytes_and_frees_the_weights(model, tmp_path):
    images = person_like_images(3, H, W, seed=5)
    with torch.inference_mode():
        before_out = model(torch.from_numpy(images.copy())).numpy()
    before = _state(model)
    plain = export_onnx(model, H, W, 17, True)
    data, spill = export_spilled(model, H, W, 17, True, tmp_path / "scratch")
    assert spill is not None and spill.hooked
    assert data == plain
    # parked: the convolution weights (most of the model) are freed until restored
    conv_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert spill.nbytes >= 0.9 * conv_bytes
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    big = [m for m in convs if before[_name(model, m) + ".weight"].numel() * 4 >= MIN_SPILL_BYTES]
    assert len(big) >= len(convs) - 2 and all(m.weight.numel() == 0 for m in big)
    assert spill.file.stat().st_size == spill.nbytes

    ctx = StageContext(tmp_path, {"torch_model": model}, lambda msg: None)
    park_model(ctx, spill)
    unused = SimpleNamespace(build_model=lambda: pytest.fail("the cached model must be reused, not rebuilt"))
    restored = model_from(ctx, unused)
    assert restored is model and not spill.file.exists()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    with torch.inference_mode():
        assert np.array_equal(model(torch.from_numpy(images.copy())).numpy(), before_out)
    assert export_onnx(model, H, W, 17, True) == plain  # and it exports the same bytes again


def test_a_failed_export_restores_the_weights_at_once(model, tmp_path, monkeypatch):
    """The exporter fails after tracing (writing its result): the weights parked by then are back before the
    error reaches the stage."""
    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

    parked_when_it_failed = []

    def full_disk(*args, **kwargs):
        parked_when_it_failed.append(sum(p.numel() == 0 for p in model.parameters()))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_proto_utils, "_export_file", full_disk)
    before = _state(model)
    with pytest.raises(StageFailed, match="ONNX export failed: .*No space left"):
        export_spilled(model, H, W, 17, True, tmp_path / "scratch")
    assert parked_when_it_failed and parked_when_it_failed[0] > 10  # the weights were out when it failed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list((tmp_path / "scratch").iterdir()) == []


def test_release_model_removes_an_unused_spill(model, tmp_path):
    _, spill = export_spilled(model, H, W, 17, True, tmp_path / "scratch")
    ctx = StageContext(tmp_path, {"torch_model": model}, lambda msg: None)
    park_model(ctx, spill)
    assert spill.file.exists()
    release_model(ctx)
    assert not spill.file.exists() and "torch_model" not in ctx.cache


HEAP_PROBE = """
import resource, sys, torch
from reidbuild import heap
heap.bound_heap()
net = torch.nn.Sequential(*[torch.nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)]).eval()
x = torch.rand(4, 64, 128, 64)  # 8 MiB activations


def faults_of_second_pass():
    with torch.inference_mode():
        net(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


mapped = faults_of_second_pass()
with heap.reusing_heap():
    reused = faults_of_second_pass()
print(mapped, reused)
"""


@pytest.mark.skipif(heap.libc() is None, reason="no glibc here: reidbuild does not tune the heap")
def test_pytorch_inference_reuses_heap_pages():
    """Under the build's heap setting (large buffers from their own mappings), every activation of 4 MiB or
    more is faulted in afresh on each pass; inside ``reusing_heap`` a second pass reuses the first one's
    pages (an R50 reference pass was twice as slow without it). In a fresh process: a heap with free chunks
    left by earlier work serves large buffers too, which would hide the difference."""
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    mapped, reused = (int(v) for v in out.stdout.split())
    assert mapped > 4 * 2048  # four 8 MiB activations or more, faulted in page by page
    assert reused < mapped / 4
