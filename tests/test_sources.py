"""A model source is one module: a toy source defined and registered here, with no edit anywhere else, is
accepted by the manifest, built by ``apply`` into ONNX with parity against its own PyTorch model, fingerprinted
by its own params and inputs, and served by ``infer``.

The toy format: a tiny JSON description of a network (normalise, conv/bn/relu, pooling, linear) and a
PyTorch ``state_dict`` file with trained-like weights (seeded, BatchNorm statistics measured on real images).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from reidbuild import lockfile, sources
from reidbuild.cli import main
from reidbuild.errors import ConfigError
from reidbuild.manifest import LoadedManifest, SourceSpec
from reidbuild.sources import ModelSource
from tests.helpers import REPO, write

H, W = 64, 32
NETWORK = {"layers": [["normalize", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]],
                      ["conv", 3, 16, 3, 2], ["bn", 16], ["relu"],
                      ["conv", 16, 32, 3, 2], ["bn", 32], ["relu"],
                      ["avgpool"], ["linear", 32, 24]]}


class Normalize(nn.Module):
    """(x - mean) / std per channel, as re-id models take RGB 0..255."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_network(layers: list[list[Any]]) -> nn.Sequential:
    """The toy network a description names, layer by layer."""
    make = {"normalize": Normalize, "bn": nn.BatchNorm2d, "relu": lambda: nn.ReLU(),
            "conv": lambda i, o, k, s: nn.Conv2d(i, o, k, stride=s, padding=k // 2, bias=False),
            "avgpool": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), "linear": nn.Linear}
    return nn.Sequential(*(make[kind](*args) for kind, *args in layers))


class ToySpec(SourceSpec):
    format: Literal["toyjson"]
    network: str  # the JSON description, relative to the manifest
    weights: str  # a torch state_dict file


class ToySource(ModelSource):
    format = "toyjson"
    spec = ToySpec
    description = "build the toy network from its JSON description"

    def __init__(self, lm: LoadedManifest) -> None:
        super().__init__(lm)
        self.toy = self.section(ToySpec)
        path = lm.resolve(self.toy.network)
        try:
            self.layers = json.loads(path.read_text())["layers"]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{path}: not a toy network description ({type(exc).__name__})") from None

    def params(self) -> dict[str, Any]:
        return {"model": self.layers, "weights": "checkpoint"}

    def inputs(self) -> dict[str, Path]:
        return {"network": self.lm.resolve(self.toy.network), "weights": self.lm.resolve(self.toy.weights)}

    def checkpoint(self) -> str:
        return self.toy.weights

    def build_model(self) -> nn.Module:
        model = build_network(self.layers)
        model.load_state_dict(torch.load(self.lm.resolve(self.toy.weights), weights_only=True))
        return model.eval()


@pytest.fixture
def toy_registered() -> Iterator[None]:
    sources.register(ToySource)
    try:
        yield
    finally:
        sources.unregister(ToySource.format)


def images(root: Path) -> list[Path]:
    out = root / "imgs"
    out.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sorted((REPO / "test_data").glob("*.png"))[:5]):
        shutil.copy(src, out / f"im{i}.png")
    return sorted(out.glob("*.png"))


def toy_project(root: Path, source: str = "format: toyjson\nnetwork: network.json\nweights: weights.pt") -> Path:
    """The toy network's description, trained-like weights and a manifest building it to ONNX with parity."""
    from reidbuild.images import load_images
    from reidbuild.testing import make_trained_like

    write(root / "network.json", json.dumps(NETWORK))
    model = make_trained_like(build_network(NETWORK["layers"]), load_images(images(root), H, W), seed=5)
    torch.save(model.state_dict(), root / "weights.pt")
    source_lines = "".join(f"  {line}\n" for line in source.splitlines())
    return write(root / "toy.yml", f"version: 1\nname: toy\nsource:\n{source_lines}input: {{height: {H}, width: {W}}}\n"
                 "output_dir: out\nparity: {images: imgs/*.png, backends: [onnxruntime]}\n")


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_a_registered_toy_source_builds_onnx_with_parity(toy_registered: None, tmp_path: Path) -> None:
    import onnxruntime as ort

    from reidbuild.images import load_images
    from reidbuild.testing import feature_cosines

    m = toy_project(tmp_path)
    code, out, err = cli("plan", str(m))
    assert code == 0, err
    for stage in ("load", "onnx.export", "onnx.simplify", "parity.onnxruntime"):
        assert stage in out, out
    code, out, err = cli("apply", str(m))
    assert code == 0, err
    lock = lockfile.read(m.with_suffix(".lock"))
    assert lock is not None
    load = lock.stages["load"]
    assert set(load.inputs) == {"network", "weights"} and load.params["model"] == NETWORK["layers"]
    assert "toy.toyjson.json" in load.outputs
    assert lock.stages["parity.onnxruntime"].status == "ok" and lock.stages["parity.onnxruntime"].record["passed"]

    # the ONNX computes what the toy network itself computes (built here, not through reidbuild)
    batch = load_images(sorted((tmp_path / "imgs").glob("*.png")), H, W)
    model = build_network(NETWORK["layers"])
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(batch)).numpy()
    cos = feature_cosines(want)
    assert cos[~np.eye(len(cos), dtype=bool)].mean() < 0.9, "the test model must tell images apart"
    sess = ort.InferenceSession(str(tmp_path / "out" / "toy.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": batch})[0]
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= 1e-4 * scale, np.abs(got - want).max()

    # infer runs the source's own model (torch) and the built ONNX the same way
    for backend in ("torch", "onnxruntime"):
        code, _, err = cli("infer", str(m), "--backend", backend, "--input", str(tmp_path / "imgs" / "*.png"),
                           "--output", str(tmp_path / backend))
        assert code == 0, err
    for i, p in enumerate(sorted((tmp_path / "imgs").glob("*.png"))):
        np.testing.assert_allclose(np.load(tmp_path / "torch" / f"{p.stem}.npy"), want[i], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(np.load(tmp_path / "onnxruntime" / f"{p.stem}.npy"), want[i], rtol=0,
                                   atol=1e-4 * scale)


def test_the_toy_sources_params_and_inputs_make_the_fingerprint(toy_registered: None, tmp_path: Path) -> None:
    m = toy_project(tmp_path)
    assert cli("apply", str(m))[0] == 0
    code, out, err = cli("plan", str(m), "--json")
    assert code == 0, err
    rows = json.loads(out)["stages"]
    assert not [r for r in rows if r["stale"]], out
    assert rows[0]["stage"] == "load" and rows[0]["description"] == ToySource.description
    # a different network description (one more output feature) re-runs the build from load on
    changed = json.loads(json.dumps(NETWORK))
    changed["layers"][-1] = ["linear", 32, 25]
    (tmp_path / "network.json").write_text(json.dumps(changed))
    code, out, err = cli("plan", str(m), "--json")
    assert code == 0, err
    stale = {r["stage"] for r in json.loads(out)["stages"] if r["stale"]}
    assert {"load", "onnx.export", "parity.onnxruntime"} <= stale, out


def test_a_format_nobody_registered_is_refused(tmp_path: Path) -> None:
    m = toy_project(tmp_path)
    code, _, err = cli("plan", str(m))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {m}:") and "source.format: got 'toyjson'" in err, err


def test_with_two_sources_each_section_is_checked_against_its_own_format(toy_registered: None,
                                                                          tmp_path: Path) -> None:
    m = toy_project(tmp_path, source="format: toyjson\nnetwork: network.json\nweights: weights.pt\nweigths: x")
    code, _, err = cli("plan", str(m))
    assert code == 2 and "source.weigths: unknown key (did you mean 'weights'?)" in err, err
    m = toy_project(tmp_path, source="format: onnx\nnetwork: network.json\nweights: weights.pt")
    code, _, err = cli("plan", str(m))
    assert code == 2 and "source.format: got 'onnx'; expected one of: 'fastreid', 'toyjson'" in err, err
