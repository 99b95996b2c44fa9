"""Shared fixtures: repo paths and a tiny, fast manifest tree in a temp folder."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest  # noqa: F401

REPO = Path(__file__).resolve().parent.parent




def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


TINY_CONFIG = """\
MODEL:
  META_ARCHITECTURE: Baseline
  BACKBONE:
    NAME: build_resnet_backbone
    DEPTH: 18x
    LAST_STRIDE: 1
    FEAT_DIM: 512
    PRETRAIN: False
  HEADS:
    NAME: EmbeddingHead
    POOL_LAYER: GlobalAvgPool
    WITH_BNNECK: True
    NECK_FEAT: before
"""


def tiny_manifest(root: Path, *, extra: str = "", backends: str = "[onnxruntime]", height: int = 64,
                  width: int = 32, name: str = "tiny", images: str = "imgs/*.png", weights: str = "{random: {seed: 1}}") -> Path:
    """A small R18 project (64x32 input, 5 images) in ``root``; returns the manifest path."""
    write(root / "cfg" / "config.yml", TINY_CONFIG)
    imgs = root / "imgs"
    if not imgs.exists():
        imgs.mkdir()
        for i, src in enumerate(sorted((REPO / "test_data").glob("*.png"))[:5]):
            shutil.copy(src, imgs / f"im{i}.png")
    return write(root / "m.yml", textwrap.dedent(f"""\
        version: 1
        name: {name}
        source:
          format: fastreid
          config: cfg/config.yml
          weights: {weights}
        input:
          height: {height}
          width: {width}
        output_dir: out
        parity:
          images: {images}
          backends: {backends}
        """) + textwrap.dedent(extra))


def tiny_model(root: Path, seed: int):
    """The fast-reid model of ``tiny_manifest(root)``'s config, with seeded random weights."""
    from reidbuild.fastreid import build_model
    from reidbuild.fastreid.checkpoint import init_random
    from reidbuild.fastreid.config import load_config

    model = build_model(load_config(root / "cfg" / "config.yml"))
    init_random(model, seed)
    return model


def write_checkpoint(model, path: Path, **kwargs) -> Path:
    """``model`` saved in fast-reid's Checkpointer layout (model + optimizer + schedulers + epoch)."""
    from reidbuild.fastreid.checkpoint import make_checkpoint

    make_checkpoint(model, path, **kwargs)
    return path


def stable_lock(text: str) -> str:
    """A lock's text without what differs between two runs that built the same thing: each stage's run time
    (``seconds``) and the hash/size of non-byte-reproducible artifacts (the report, which shows run times)."""
    import yaml

    doc = yaml.safe_load(text)
    for rec in doc.get("stages", {}).values():
        rec.pop("seconds", None)
        for entry in rec.get("outputs", {}).values():
            if entry.get("reproducible") is False and str(entry.get("path", "")).endswith(".report.html"):
                entry.pop("sha256", None)
                entry.pop("size", None)
    return yaml.safe_dump(doc, sort_keys=True)


HEAVY = ("torch", "onnx", "onnxruntime", "onnxsim", "matplotlib", "numpy", "caffe", "cv2", "PIL")


def apply_in_fresh_interpreter(manifest: Path) -> tuple[int, str, str, list[str]]:
    """``reidbuild apply manifest`` in a new Python process (as a user runs it): exit code, stdout, stderr and
    which of the HEAVY packages it imported."""
    import json
    import os
    import subprocess
    import sys

    probe = ("import sys, json\nsys.argv = ['reidbuild', 'apply', sys.argv[1]]\nfrom reidbuild.cli import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             f"print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})]))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", probe, str(manifest)], capture_output=True, text=True, env=env,
                       cwd=manifest.parent)
    code, heavy = json.loads(r.stdout.strip().splitlines()[-1])
    return code, r.stdout, r.stderr, heavy


def tree(folder: Path) -> dict[str, bytes]:
    """Every visible file below ``folder`` with its bytes (the stat cache and run lock, dot files, left out):
    two builds of the same thing must give equal trees."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}
