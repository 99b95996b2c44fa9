"""The user's own fast-reid code as the model source (``source.format: fastreid`` with ``source.model_code``).

The manifest opts in to the user's importable fast-reid instead of reidbuild's built-in architectures -- a
fork's root folder (the one holding its ``fastreid`` package) or ``installed`` (the ``fastreid`` package of this
Python) -- so models with heads or backbones registered in the user's code deploy too. That runs the user's
code, hence opt-in only; the code's location and a sha256 over its ``.py`` files enter the load stage's
fingerprint, so an edit re-runs the build. The config file, the checkpoint and everything after the PyTorch
model (export, conversion, parity) are the same as for the built-in architectures (``fastreid.py``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ManifestError, Unavailable
from .fastreid import FastReidSource

if TYPE_CHECKING:
    from torch import nn

INSTALLED = "installed"


class FastReidCodeSource(FastReidSource):
    """A fast-reid config + checkpoint built by the user's ``fastreid.modeling.build_model``."""

    def read_config(self) -> dict[str, Any]:
        """The config as the user's fast-reid reads it, as plain data (what the stages fingerprint)."""
        from ..fastreid.config import plain

        with self.user_fastreid() as fastreid:
            config: dict[str, Any] = plain(self.user_cfg(fastreid))
        return config

    def network_params(self) -> dict[str, Any]:
        """All of MODEL (but the device: user code may read any MODEL key) and the user code's identity."""
        root, files = self.code_files()
        # as written (not the resolved folder), so the same code elsewhere (CI, another venv) fingerprints the same
        code = {"from": self.fastreid.model_code, "py_files": len(files), "sha256": code_digest(root, files)}
        return {"MODEL": {k: v for k, v in self.config["MODEL"].items() if k != "DEVICE"}, "model_code": code}

    def facts(self) -> dict[str, Any]:
        """The folder the user's code was imported from."""
        return {"model_code_path": str(self.code_root())}

    def build_network(self) -> "nn.Module":
        """The user's model, eval mode on the CPU, pretraining off (weights come from the checkpoint)."""
        with self.user_fastreid() as fastreid:
            ucfg = self.user_cfg(fastreid)
            ucfg.MODEL.DEVICE = "cpu"
            ucfg.MODEL.BACKBONE.PRETRAIN = False  # weights come from the checkpoint; nothing is downloaded
            try:
                model: nn.Module = importlib.import_module("fastreid.modeling").build_model(ucfg)
            except Exception as exc:  # noqa: BLE001 - the user's code may raise anything: a config it cannot build
                raise ConfigError(f"{self.config_path}: the model_code's build_model failed: "
                                  f"{one_line(exc)}") from None
        model.eval()
        model.requires_grad_(False)
        return model

    # ----------------------------------------------------------------------- the user's code

    def _where(self) -> str:
        return f"{self.lm.where('source', 'model_code')}: source.model_code"

    def code_root(self) -> Path:
        """The folder the user's ``fastreid`` package is imported from (checked: it must hold one)."""
        value = self.fastreid.model_code
        if value == INSTALLED:
            spec = importlib.util.find_spec("fastreid")
            if spec is None or not spec.submodule_search_locations:
                raise Unavailable(f"{self._where()}: 'installed' but no fastreid package is installed in this "
                                  "Python (pip install --no-deps fastreid==1.4.0, or give the path of your fast-reid)")
            return Path(next(iter(spec.submodule_search_locations))).resolve().parent
        root = self.lm.resolve(str(value))
        if not root.is_dir():
            raise ManifestError(f"{self._where()}: {value!r} is not a folder (expected a fast-reid checkout's root, "
                                f"or '{INSTALLED}')")
        if not (root / "fastreid" / "__init__.py").is_file():
            raise ManifestError(f"{self._where()}: {root} has no importable fastreid package (fastreid/__init__.py "
                                "not found); give the folder that holds it")
        return root

    def code_files(self) -> tuple[Path, list[Path]]:
        """The code root and the ``.py`` files of the ``fastreid`` package there, sorted."""
        root = self.code_root()
        files = sorted(p for p in (root / "fastreid").rglob("*.py") if "__pycache__" not in p.parts)
        return root, files

    @contextlib.contextmanager
    def user_fastreid(self) -> Iterator[Any]:
        """``fastreid`` imported from the manifest's model_code; any other loaded fastreid is set aside meanwhile
        and restored afterwards, so two manifests (or a test's own fast-reid) never see each other's modules."""
        root = self.code_root()
        if self.fastreid.model_code == INSTALLED:
            yield self._import_fastreid(root)  # the package this Python imports anyway: no need to set others aside
            return
        saved = _take_fastreid_modules()
        sys.path.insert(0, str(root))
        try:
            yield self._import_fastreid(root)
        finally:
            sys.path.remove(str(root))
            _take_fastreid_modules()
            sys.modules.update(saved)

    def _import_fastreid(self, root: Path) -> Any:
        """``fastreid`` (and its modeling registry) imported, and checked to come from ``root``."""
        try:
            fastreid = importlib.import_module("fastreid")
            importlib.import_module("fastreid.modeling")
        except Exception as exc:  # noqa: BLE001 - importing the user's code may raise anything
            raise ManifestError(f"{self._where()}: importing fastreid from {root} failed: {one_line(exc)}") from None
        origin = fastreid.__file__
        if origin is None or not Path(origin).resolve().is_relative_to(root):
            raise ManifestError(f"{self._where()}: fastreid was imported from {fastreid.__file__}, not from {root}")
        return fastreid

    def user_cfg(self, fastreid: Any) -> Any:
        """The config as the user's fast-reid reads it (its get_cfg defaults, _BASE_, then the manifest's opts)."""
        path = self.config_path
        if not path.is_file():
            raise ConfigError(f"{path}: fast-reid config not found")
        try:
            cfg = importlib.import_module("fastreid.config").get_cfg()
            cfg.merge_from_file(str(path))
            flat: list[Any] = []
            for key, value in self.fastreid.opts.items():
                flat += [key, list(value) if isinstance(value, list) else value]
            cfg.merge_from_list(flat)
        except Exception as exc:  # noqa: BLE001 - the user's config code may raise anything
            raise ConfigError(f"{path}: the model_code's fast-reid cannot read this config: {one_line(exc)}") from None
        return cfg


def code_digest(root: Path, files: list[Path]) -> str:
    """sha256 over each file's path (relative to ``root``) and content: any edit, addition or removal shows."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _take_fastreid_modules() -> dict[str, Any]:
    taken = {k: m for k, m in sys.modules.items() if k == "fastreid" or k.startswith("fastreid.")}
    for k in taken:
        del sys.modules[k]
    return taken


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
