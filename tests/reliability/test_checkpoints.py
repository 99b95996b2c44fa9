"""Untrusted checkpoints through the CLI: a pickle that would run code is refused without running it; corrupt,
truncated, mis-shaped or non-finite checkpoints are each one clear line, exit 2, no traceback, no lock."""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_manifest, tiny_model, write_checkpoint
from tests.reliability._util import assert_one_line_error, cli, count, run_cli


class _Payload:
    """Unpickling this runs ``exec``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _evil(kind: str, path: Path, marker: Path) -> None:
    obj = {"model": {"backbone.conv1.weight": _Payload(marker)}}
    if kind == "torch zip":
        torch.save(obj, path)
    elif kind == "torch legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif kind == "raw pickle":
        path.write_bytes(pickle.dumps(obj))
    else:  # a zip whose data.pkl is a bare payload
        buf = io.BytesIO()
        torch.save({"model": {}}, buf)
        src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
        with zipfile.ZipFile(path, "w") as z:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith("data.pkl"):
                    data = pickle.dumps(_Payload(marker), protocol=2)
                z.writestr(info, data)


def _armed(path: Path, marker: Path, kind: str) -> None:
    """Control: a plain (unsafe) load of this very file does run the payload."""
    if kind == "raw pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


EVIL_CONTAINERS = ("torch zip", "torch legacy", "raw pickle", "zip with bare payload")


@pytest.mark.parametrize("kind", EVIL_CONTAINERS)
def test_code_carrying_pickle_is_refused_without_running_it(tmp_path, kind):
    m = tiny_manifest(tmp_path, weights="model_final.pth")
    marker = tmp_path / "PWNED"
    pth = tmp_path / "model_final.pth"
    _evil(kind, pth, marker)
    _armed(pth, marker, kind)
    if kind == "torch zip":  # the realistic case in a real, separate process
        r = run_cli("apply", m)
        code, err = r.returncode, r.stderr
    else:
        code, _, err = cli("apply", m)
    line = assert_one_line_error(code, err, 2, "model_final.pth")
    assert "not executed" in line or "unsafe" in line or "not a readable" in line, line
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert not (tmp_path / "m.lock").exists()
    count("checkpoints: code-carrying pickles refused")


def _model(tmp_path: Path):
    return tiny_model(tmp_path, 3)


def _good(tmp_path: Path, path: Path, extras: bool = True) -> None:
    write_checkpoint(_model(tmp_path), path, with_training_extras=extras)


def _state(tmp_path: Path) -> dict:
    return {k: v.clone() for k, v in _model(tmp_path).state_dict().items()}


def _truncated(tmp_path, p):
    _good(tmp_path, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _no_central_directory(tmp_path, p):
    _good(tmp_path, p, extras=False)
    data = p.read_bytes()
    p.write_bytes(data[:-200])


def _garbage(tmp_path, p):
    p.write_bytes(bytes(range(256)) * 64)


def _zip_of_text(tmp_path, p):
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "not a checkpoint")


def _empty(tmp_path, p):
    p.write_bytes(b"")


def _folder(tmp_path, p):
    p.mkdir()


def _list_top(tmp_path, p):
    torch.save([1, 2, 3], p)


def _no_tensors(tmp_path, p):
    torch.save({"epoch": 3, "solver": {"lr": 0.1}}, p)


def _model_not_dict(tmp_path, p):
    torch.save({"model": torch.zeros(3)}, p)


def _empty_state(tmp_path, p):
    torch.save({"model": {}}, p)


def _nan(tmp_path, p):
    s = _state(tmp_path)
    s["backbone.layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save({"model": s}, p)


def _inf(tmp_path, p):
    s = _state(tmp_path)
    s["heads.bottleneck.0.running_var"][5] = float("inf")
    torch.save({"model": s}, p)


def _wrong_shape(tmp_path, p):
    s = _state(tmp_path)
    s["backbone.layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save({"model": s}, p)


def _missing_key(tmp_path, p):
    s = _state(tmp_path)
    del s["backbone.layer4.1.bn2.weight"]
    torch.save({"model": s}, p)


def _other_depth(tmp_path, p):
    from reidbuild.fastreid import build_model
    from reidbuild.fastreid.checkpoint import make_checkpoint
    from reidbuild.fastreid.config import load_config

    cfg_path = tmp_path / "r34.yml"
    cfg_path.write_text((tmp_path / "cfg" / "config.yml").read_text().replace("DEPTH: 18x", "DEPTH: 34x"))
    make_checkpoint(build_model(load_config(cfg_path)), p)


def _non_tensor_value(tmp_path, p):
    s = _state(tmp_path)
    s["backbone.conv1.weight"] = [1.0, 2.0]
    torch.save({"model": s}, p)


BAD = {
    "truncated zip": (_truncated, ""),
    "zip without central directory": (_no_central_directory, ""),
    "random bytes": (_garbage, ""),
    "zip of a text file": (_zip_of_text, ""),
    "empty file": (_empty, "empty"),
    "a folder": (_folder, "folder"),
    "top level is a list": (_list_top, "top level is a list"),
    "no tensors": (_no_tensors, "unrecognised layout"),
    "'model' is a tensor": (_model_not_dict, "'model' entry"),
    "empty state_dict": (_empty_state, "empty"),
    "NaN weight": (_nan, "NaN or Inf"),
    "Inf buffer": (_inf, "NaN or Inf"),
    "wrong shape": (_wrong_shape, "backbone.layer2.0.conv1.weight"),
    "missing key": (_missing_key, "backbone.layer4.1.bn2.weight"),
    "other ResNet depth": (_other_depth, ""),
    "non-tensor value": (_non_tensor_value, "tensors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_one_line_exit_2_and_no_lock(tmp_path, case):
    make, needle = BAD[case]
    m = tiny_manifest(tmp_path, weights="model_final.pth")
    make(tmp_path, tmp_path / "model_final.pth")
    code, out, err = cli("apply", m)
    line = assert_one_line_error(code, err, 2, needle)
    assert "model_final.pth" in line, line
    assert not (tmp_path / "m.lock").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".reidbuild")] \
        if (tmp_path / "out").exists() else True
    count("checkpoints: bad checkpoints refused")
