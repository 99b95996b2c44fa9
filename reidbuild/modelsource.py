"""Where the PyTorch model comes from: reidbuild's built-in fast-reid architectures, or the user's own fast-reid.

By default reidbuild reads the config with its own hardened reader and builds one of its built-in
architectures (``reidbuild.fastreid``). With ``source.model_code`` the manifest opts in to the user's
importable fast-reid instead -- a fork's root folder (the one holding its ``fastreid`` package) or
``installed`` (the ``fastreid`` package of this Python) -- so models with heads or backbones registered in the
user's code deploy too. That runs the user's code, hence opt-in only; the code's location and a sha256 over its
``.py`` files enter the load stage's fingerprint, so an edit re-runs the build. Everything after the PyTorch
model (export, conversion, parity) is the same for both sources.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, ManifestError, Unavailable
from .manifest import LoadedManifest

INSTALLED = "installed"
# the keys that decide the deployed network; solver, datasets, losses and the classifier do not
_TRAINING_ONLY_HEAD_KEYS = ("CLS_LAYER", "MARGIN", "SCALE", "NUM_CLASSES")


def config(lm: LoadedManifest) -> dict[str, Any]:
    """The resolved fast-reid config as plain data (what the stages fingerprint)."""
    src = lm.model.source
    if src.model_code is None:
        from .fastreid.config import load_config

        return load_config(lm.resolve(src.config), dict(src.opts))
    with _user_fastreid(lm) as fastreid:
        cfg: dict[str, Any] = _as_builtin(_user_cfg(lm, fastreid))
        return cfg


def params(lm: LoadedManifest, cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of the config that shapes the inference graph, plus the user code's identity when used.

    Built-in architectures read a known set of keys; user code may read any MODEL key, so all of MODEL
    (but the device) counts.
    """
    model = cfg["MODEL"]
    if lm.model.source.model_code is None:
        heads = {k: v for k, v in model["HEADS"].items() if k not in _TRAINING_ONLY_HEAD_KEYS}
        return {"META_ARCHITECTURE": model["META_ARCHITECTURE"], "BACKBONE": model["BACKBONE"], "HEADS": heads,
                "PIXEL_MEAN": model["PIXEL_MEAN"], "PIXEL_STD": model["PIXEL_STD"]}
    root, files = code_files(lm)
    # as written (not the resolved folder), so the same code elsewhere (CI, another venv) fingerprints the same
    code = {"from": lm.model.source.model_code, "py_files": len(files), "sha256": code_digest(root, files)}
    return {"MODEL": {k: v for k, v in model.items() if k != "DEVICE"}, "model_code": code}


def facts(lm: LoadedManifest) -> dict[str, Any]:
    """What the lock records beside the fingerprint: the folder the user's code was imported from."""
    return {} if lm.model.source.model_code is None else {"model_code_path": str(code_root(lm))}


def build(lm: LoadedManifest, cfg: dict[str, Any]) -> Any:
    """The untrained eval-mode model on the CPU (weights come afterwards from the checkpoint)."""
    if lm.model.source.model_code is None:
        from .fastreid.registry import build_model

        return build_model(cfg)
    with _user_fastreid(lm) as fastreid:
        ucfg = _user_cfg(lm, fastreid)
        ucfg.MODEL.DEVICE = "cpu"
        ucfg.MODEL.BACKBONE.PRETRAIN = False  # weights come from the checkpoint; nothing is downloaded
        try:
            model = importlib.import_module("fastreid.modeling").build_model(ucfg)
        except Exception as exc:  # noqa: BLE001 - the user's code may raise anything: a config it cannot build
            raise ConfigError(f"{lm.resolve(lm.model.source.config)}: the model_code's build_model failed: "
                              f"{_one_line(exc)}") from None
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- the user's code


def code_root(lm: LoadedManifest) -> Path:
    """The folder the user's ``fastreid`` package is imported from (checked: it must hold one)."""
    value = lm.model.source.model_code
    where = f"{lm.where('source', 'model_code')}: source.model_code"
    if value == INSTALLED:
        spec = importlib.util.find_spec("fastreid")
        if spec is None or not spec.submodule_search_locations:
            raise Unavailable(f"{where}: 'installed' but no fastreid package is installed in this Python "
                              "(pip install --no-deps fastreid==1.4.0, or give the path of your fast-reid)")
        return Path(next(iter(spec.submodule_search_locations))).resolve().parent
    root = lm.resolve(str(value))
    if not root.is_dir():
        raise ManifestError(f"{where}: {value!r} is not a folder (expected a fast-reid checkout's root, "
                            f"or '{INSTALLED}')")
    if not (root / "fastreid" / "__init__.py").is_file():
        raise ManifestError(f"{where}: {root} has no importable fastreid package (fastreid/__init__.py "
                            "not found); give the folder that holds it")
    return root


def code_files(lm: LoadedManifest) -> tuple[Path, list[Path]]:
    """The code root and the ``.py`` files of the ``fastreid`` package there, sorted."""
    root = code_root(lm)
    files = sorted(p for p in (root / "fastreid").rglob("*.py") if "__pycache__" not in p.parts)
    return root, files


def code_digest(root: Path, files: list[Path]) -> str:
    """sha256 over each file's path (relative to ``root``) and content: any edit, addition or removal shows."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@contextlib.contextmanager
def _user_fastreid(lm: LoadedManifest) -> Iterator[Any]:
    """``fastreid`` imported from the manifest's model_code; any other loaded fastreid is set aside meanwhile
    and restored afterwards, so two manifests (or a test's own fast-reid) never see each other's modules."""
    root = code_root(lm)
    if lm.model.source.model_code == INSTALLED:
        yield _import_fastreid(lm, root)  # the package this Python imports anyway: no need to set others aside
        return
    saved = _take_fastreid_modules()
    sys.path.insert(0, str(root))
    try:
        yield _import_fastreid(lm, root)
    finally:
        sys.path.remove(str(root))
        _take_fastreid_modules()
        sys.modules.update(saved)


def _import_fastreid(lm: LoadedManifest, root: Path) -> Any:
    """``fastreid`` (and its modeling registry) imported, and checked to come from ``root``."""
    where = f"{lm.where('source', 'model_code')}: source.model_code"
    try:
        fastreid = importlib.import_module("fastreid")
        importlib.import_module("fastreid.modeling")
    except Exception as exc:  # noqa: BLE001 - importing the user's code may raise anything
        raise ManifestError(f"{where}: importing fastreid from {root} failed: {_one_line(exc)}") from None
    if not Path(str(fastreid.__file__)).resolve().is_relative_to(root):
        raise ManifestError(f"{where}: fastreid was imported from {fastreid.__file__}, not from {root}")
    return fastreid


def _take_fastreid_modules() -> dict[str, Any]:
    taken = {k: m for k, m in sys.modules.items() if k == "fastreid" or k.startswith("fastreid.")}
    for k in taken:
        del sys.modules[k]
    return taken


def _user_cfg(lm: LoadedManifest, fastreid: Any) -> Any:
    """The config as the user's fast-reid reads it (its get_cfg defaults, _BASE_, then the manifest's opts)."""
    src = lm.model.source
    path = lm.resolve(src.config)
    if not path.is_file():
        raise ConfigError(f"{path}: fast-reid config not found")
    try:
        cfg = importlib.import_module("fastreid.config").get_cfg()
        cfg.merge_from_file(str(path))
        flat: list[Any] = []
        for key, value in src.opts.items():
            flat += [key, list(value) if isinstance(value, list) else value]
        cfg.merge_from_list(flat)
    except Exception as exc:  # noqa: BLE001 - the user's config code may raise anything
        raise ConfigError(f"{path}: the model_code's fast-reid cannot read this config: {_one_line(exc)}") from None
    return cfg


def _as_builtin(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _as_builtin(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_as_builtin(v) for v in node]
    return node


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__

