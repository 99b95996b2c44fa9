"""Checkpoints: fast-reid's on-disk layout, strict loading, safe unpickling, seeded weights."""
from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from reidbuild.errors import CheckpointError
from reidbuild.fastreid import build_model, init_random, is_training_only, load_weights, make_checkpoint

OPTS = {"MODEL.HEADS.WITH_BNNECK": True, "MODEL.HEADS.POOL_LAYER": "GeneralizedMeanPoolingP",
        "MODEL.HEADS.NUM_CLASSES": 751}


@pytest.fixture(scope="module")
def cfg(make_cfg):
    return make_cfg("18x", **OPTS)


@pytest.fixture(scope="module")
def trained(cfg):
    """Stands in for a trained model: seeded weights, as fast-reid would have saved them."""
    model = build_model(cfg)
    init_random(model, 11)
    return model


@pytest.fixture(scope="module")
def final_pth(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    make_checkpoint(trained, path)
    return path


@pytest.fixture(scope="module")
def saved_state(final_pth) -> OrderedDict:
    return torch.load(final_pth, map_location="cpu", weights_only=True)["model"]


def fresh(cfg, seed: int = 99):
    model = build_model(cfg)
    init_random(model, seed)
    return model


def features(model, make_images) -> torch.Tensor:
    with torch.no_grad():
        return model(make_images())


def save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def error_of(cfg, path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_weights(build_model(cfg), path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


# --------------------------------------------------------------------------- layout and round trip


def test_make_checkpoint_writes_fast_reid_training_layout(final_pth, trained) -> None:
    data = torch.load(final_pth, map_location="cpu", weights_only=True)
    assert set(data) == {"model", "optimizer", "lr_sched", "warmup_sched", "epoch", "metric"}
    assert isinstance(data["epoch"], int)
    assert set(data["optimizer"]) == {"state", "param_groups"}
    state = data["model"]
    ours = trained.state_dict()
    assert set(state) == set(ours) | {"heads.weight"}
    assert list(state["heads.weight"].shape) == [751, 512]  # [NUM_CLASSES, feature dim]
    keys = list(state)
    assert keys.index("heads.weight") < keys.index("heads.pool_layer.p")  # the head's own parameter first
    assert all(torch.equal(state[k], v) for k, v in ours.items())


def test_make_checkpoint_without_extras(trained, tmp_path) -> None:
    path = tmp_path / "bare.pth"
    make_checkpoint(trained, path, with_training_extras=False)
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert set(data) == {"model"} and set(data["model"]) == set(trained.state_dict())


def test_round_trip_gives_identical_features(cfg, trained, final_pth, make_images) -> None:
    model = fresh(cfg)
    assert not torch.equal(features(model, make_images), features(trained, make_images))
    load_weights(model, final_pth)
    assert torch.equal(features(model, make_images), features(trained, make_images))
    assert not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_bare_state_dict_and_dataparallel_prefix(cfg, trained, saved_state, tmp_path, make_images) -> None:
    want = features(trained, make_images)
    bare = save(tmp_path / "bare.pth", trained.state_dict())
    model = fresh(cfg)
    load_weights(model, bare)
    assert torch.equal(features(model, make_images), want)
    wrapped = save(tmp_path / "dp.pth", {"model": OrderedDict((f"module.{k}", v) for k, v in saved_state.items())})
    model = fresh(cfg)
    load_weights(model, wrapped)
    assert torch.equal(features(model, make_images), want)


def test_v1_0_layout_with_classifier_module_and_pixel_buffers(cfg, trained, saved_state, tmp_path, make_images) -> None:
    """fast-reid <= v1.0 kept the classifier in heads.classifier (ArcSoftmax: also a buffer t)
    and stored pixel_mean/pixel_std in the checkpoint."""
    state = OrderedDict(saved_state)
    state.pop("heads.weight")
    state["heads.classifier.weight"] = torch.zeros(751, 512)
    state["heads.classifier.t"] = torch.zeros(1)
    state["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    state["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    for k in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[k]  # counters may be absent too
    model = fresh(cfg)
    load_weights(model, save(tmp_path / "v10.pth", {"model": state, "iteration": 1000}))
    assert torch.equal(features(model, make_images), features(trained, make_images))
    state["pixel_std"] = torch.tensor([1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    message = error_of(cfg, save(tmp_path / "v10bad.pth", {"model": state}))
    assert "pixel_std" in message and "MODEL.PIXEL_STD" in message


def test_training_only_keys_are_named() -> None:
    for key in ("heads.weight", "heads.classifier.weight", "heads.classifier.t", "heads.cls_layer.foo",
                "backbone.bn1.num_batches_tracked"):
        assert is_training_only(key), key
    for key in ("heads.bottleneck.0.weight", "heads.pool_layer.p", "backbone.layer1.0.bn1.weight", "weight"):
        assert not is_training_only(key), key


# --------------------------------------------------------------------------- mismatches


def test_missing_key_is_listed(cfg, saved_state, tmp_path) -> None:
    state = OrderedDict(saved_state)
    del state["backbone.layer2.1.bn2.running_var"]
    message = error_of(cfg, save(tmp_path / "m.pth", {"model": state}))
    assert "1 missing: backbone.layer2.1.bn2.running_var" in message


def test_many_missing_keys_are_truncated_with_a_count(cfg, saved_state, tmp_path) -> None:
    state = OrderedDict((k, v) for k, v in saved_state.items() if not k.startswith("backbone.layer4."))
    message = error_of(cfg, save(tmp_path / "m.pth", {"model": state}))
    n_missing = len([k for k in saved_state if k.startswith("backbone.layer4.") and "num_batches" not in k])
    assert f"{n_missing} missing" in message and f"(+{n_missing - 6} more)" in message
    assert len(message) < 600


def test_unexpected_key_is_listed(cfg, saved_state, tmp_path) -> None:
    state = OrderedDict(saved_state)
    state["backbone.layer1.0.se.fc.0.weight"] = torch.zeros(4, 64)  # an SE model's key
    message = error_of(cfg, save(tmp_path / "u.pth", {"model": state}))
    assert "1 unexpected: backbone.layer1.0.se.fc.0.weight" in message


def test_wrong_shape_is_listed_with_both_shapes(cfg, saved_state, tmp_path) -> None:
    state = OrderedDict(saved_state)
    state["heads.bottleneck.0.weight"] = torch.ones(2048)
    message = error_of(cfg, save(tmp_path / "s.pth", {"model": state}))
    assert "wrong shape: heads.bottleneck.0.weight [2048] vs model [512]" in message


def test_model_for_another_config_does_not_load(make_cfg, final_pth) -> None:
    model = build_model(make_cfg("18x", **{**OPTS, "MODEL.BACKBONE.WITH_IBN": True}))
    with pytest.raises(CheckpointError) as info:
        load_weights(model, final_pth)
    assert "backbone.layer1.0.bn1.IN.weight" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(cfg, saved_state, tmp_path, bad) -> None:
    state = OrderedDict(saved_state)
    tensor = state["backbone.layer3.0.conv2.weight"].clone()
    tensor.view(-1)[17] = bad
    state["backbone.layer3.0.conv2.weight"] = tensor
    message = error_of(cfg, save(tmp_path / "nan.pth", {"model": state}))
    assert "NaN or Inf" in message and "backbone.layer3.0.conv2.weight" in message


def test_non_tensor_value_is_named(cfg, saved_state, tmp_path) -> None:
    state = OrderedDict(saved_state)
    state["backbone.bn1.weight"] = [1.0] * 64
    message = error_of(cfg, save(tmp_path / "nt.pth", {"model": state}))
    assert "backbone.bn1.weight (list)" in message


def test_integer_weight_is_refused(cfg, saved_state, tmp_path) -> None:
    state = OrderedDict(saved_state)
    state["backbone.conv1.weight"] = state["backbone.conv1.weight"].to(torch.int32)
    assert "not floating point: backbone.conv1.weight" in error_of(cfg, save(tmp_path / "int.pth", {"model": state}))


def test_half_precision_weights_load(cfg, trained, saved_state, tmp_path, make_images) -> None:
    state = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in saved_state.items())
    model = fresh(cfg)
    load_weights(model, save(tmp_path / "fp16.pth", {"model": state}))
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(features(model, make_images), features(trained, make_images), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("obj, needle", [
    ([1, 2, 3], "top level is a list"),
    ({"optimizer": {}, "iteration": 3}, "unrecognised layout"),
    ({"model": [torch.zeros(1)]}, "'model' entry is a list"),
    ({"model": {}}, "empty"),
    ({"model": {1: torch.zeros(1)}}, "keys must be strings"),
])
def test_wrong_layouts(cfg, tmp_path, obj, needle) -> None:
    assert needle in error_of(cfg, save(tmp_path / "layout.pth", obj))


# --------------------------------------------------------------------------- unreadable files


def test_missing_and_directory_and_empty(cfg, tmp_path) -> None:
    assert "not found" in error_of(cfg, tmp_path / "absent.pth")
    (tmp_path / "dir.pth").mkdir()
    assert "not a file" in error_of(cfg, tmp_path / "dir.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty" in error_of(cfg, tmp_path / "empty.pth")


def test_truncated_checkpoint(cfg, final_pth, tmp_path) -> None:
    data = final_pth.read_bytes()
    for fraction in (0.5, 0.99):
        path = tmp_path / f"trunc{fraction}.pth"
        path.write_bytes(data[: int(len(data) * fraction)])
        assert "corrupt or truncated" in error_of(cfg, path)


def test_not_a_checkpoint(cfg, tmp_path) -> None:
    (tmp_path / "text.pth").write_text("MODEL:\n  DEVICE: cuda\n")
    error_of(cfg, tmp_path / "text.pth")
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 64)
    error_of(cfg, tmp_path / "noise.pth")


def test_corrupted_bytes_inside_the_archive(cfg, final_pth, tmp_path) -> None:
    data = bytearray(final_pth.read_bytes())
    for i in range(64, 576):
        data[i] ^= 0xFF  # the first member's header and pickle
    path = tmp_path / "flipped.pth"
    path.write_bytes(bytes(data))
    error_of(cfg, path)


class _Payload:
    """Unpickling this object calls the target; a safe loader must refuse before that happens."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle", "nested_in_optimizer"])
@pytest.mark.parametrize("attack", ["open", "system"])
def test_malicious_pickle_is_refused_and_never_executed(cfg, saved_state, tmp_path, container, attack) -> None:
    marker = tmp_path / "PWNED"
    payload = _Payload(open, str(marker), "w") if attack == "open" else _Payload(os.system, f"touch {marker}")
    path = tmp_path / "evil.pth"
    if container == "torch_zip":
        torch.save({"model": payload}, path)
    elif container == "raw_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save({"model": saved_state, "optimizer": {"state": payload}}, path)
    assert not marker.exists()
    message = error_of(cfg, path)
    assert "unsafe" in message and "NOT executed" in message
    assert not marker.exists()


# --------------------------------------------------------------------------- init_random


def _digest(model) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_init_random_is_deterministic_and_seed_dependent(cfg) -> None:
    a, b, c = build_model(cfg), build_model(cfg), build_model(cfg)
    init_random(a, 5)
    init_random(b, 5)
    init_random(c, 6)
    assert _digest(a) == _digest(b)
    assert all(not torch.equal(a.state_dict()[k], c.state_dict()[k])
               for k in a.state_dict() if not k.endswith("num_batches_tracked"))


def test_init_random_is_bit_identical_in_a_new_process(cfg, minimal_yaml) -> None:
    model = build_model(cfg)
    init_random(model, 5)
    script = (
        "import hashlib, torch\n"
        "from reidbuild.fastreid import build_model, init_random, load_config\n"
        f"m = build_model(load_config({str(minimal_yaml)!r}, "
        f"{dict(OPTS, **{'MODEL.BACKBONE.DEPTH': '18x', 'MODEL.BACKBONE.FEAT_DIM': 512})!r}))\n"
        "init_random(m, 5)\n"
        "h = hashlib.sha256()\n"
        "for k, v in m.state_dict().items():\n"
        "    h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _digest(model)


def test_init_random_covers_every_tensor_with_sane_values(make_cfg) -> None:
    cfg = make_cfg("50x", **{"MODEL.BACKBONE.WITH_IBN": True, "MODEL.BACKBONE.WITH_SE": True,
                             "MODEL.BACKBONE.WITH_NL": True, "MODEL.HEADS.WITH_BNNECK": True,
                             "MODEL.HEADS.POOL_LAYER": "GeneralizedMeanPoolingP", "MODEL.HEADS.EMBEDDING_DIM": 128})
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_random(model, 0)
    after = model.state_dict()
    for key, value in after.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert not torch.equal(value, before[key]), f"{key} kept its constructor value"
        assert bool(torch.isfinite(value).all()), key
        if key.endswith("running_var"):
            assert 0.5 <= float(value.min()) and float(value.max()) <= 1.5, key
        if key.endswith("running_mean"):
            assert float(value.abs().max()) <= 0.1 and float(value.abs().max()) > 0, key
    assert model.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])  # config, not random
    assert 2.5 <= float(model.heads.pool_layer.p) <= 3.5


def test_seeded_features_are_order_one(make_model, make_images) -> None:
    model = make_model("50x", seed=1, **{"MODEL.BACKBONE.WITH_NL": True, "MODEL.HEADS.WITH_BNNECK": True})
    with torch.no_grad():
        y = model(make_images(seed=1))
    assert bool(torch.isfinite(y).all())
    assert 0.1 < float(y.abs().mean()) < 10.0 and float(y.std()) > 0.1
