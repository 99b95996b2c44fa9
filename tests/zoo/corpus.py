"""fast-reid's shipped configs as checkpoints made by fast-reid's own code, and what reidbuild makes of them.

For one config of the corpus (tests/zoo/fastreid_configs, written by scripts/fastreid_configs.py):

1. fast-reid's ``get_cfg()`` + the config's settings + the dataset's identity count (what fast-reid's trainer
   sets) give the training config; fast-reid's ``build_model`` builds the model from it on the CPU;
2. the model gets trained-like weights (``reidbuild.testing.make_trained_like``: seeded weights, BatchNorm
   statistics measured on person-like images);
3. it is saved the way fast-reid's training leaves it: ``config.yaml`` from ``cfg.dump()`` (MODEL.DEVICE cuda,
   PRETRAIN as configured, NUM_CLASSES set) and ``model_final.pth`` from fast-reid's ``Checkpointer`` with the
   optimizer and schedulers fast-reid's solver builds;
4. fast-reid's eval output on the parity images is the reference for the built ONNX model and Caffe net.

Nothing here re-implements fast-reid: every model, config and checkpoint comes from the installed package.
"""
from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "zoo" / "fastreid_configs"

BN_IMAGES = 12      # person-like images the BatchNorm statistics are measured on
PARITY_IMAGES = 4   # images the artifacts are compared on (other images than the BN ones)
SEED = 7
# fast-reid eval features vs the ONNX model / Caffe net, both L2-normalised (what re-id matching compares).
# fp32 export and conversion differ from PyTorch by summation order only, which IBN's InstanceNorm amplifies:
# measured max |diff| <= 2.5e-6 over the 43 configs (up to 9.1e-5 on R101-ibn with trained-like weights whose
# residual branches were not calmed); a wrong layer, mean/std or channel order moves normalised features by 1e-2
# or more.
NORM_ATOL = 5e-4
MIN_COSINE = 0.99999
MAX_MEAN_COSINE_BETWEEN_IMAGES = 0.9  # trained-like features separate images ("well below 0.95")


def config_files() -> list[Path]:
    """Every config of the corpus, sorted (43 for fast-reid commit c9bc3ce)."""
    return sorted(CORPUS.rglob("*.yml"))


def config_id(path: Path) -> str:
    """'Market1501/bagtricks_R50': the config's place in fast-reid's configs/ folder, without .yml."""
    return path.relative_to(CORPUS).with_suffix("").as_posix()


def read_entry(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def training_cfg(entry: dict[str, Any]) -> Any:
    """The config fast-reid's train_net.py runs with (and dumps): defaults + settings + NUM_CLASSES."""
    from fastreid.config import get_cfg

    cfg = get_cfg()
    flat: list[Any] = []
    for key, value in entry["settings"].items():
        flat += [key, value]
    cfg.merge_from_list(flat)
    cfg.MODEL.HEADS.NUM_CLASSES = int(entry["identities"])  # DefaultTrainer.auto_scale_hyperparams
    return cfg


def cpu_model(cfg: Any) -> Any:
    """fast-reid's own model for ``cfg``, on the CPU, without fetching ImageNet weights."""
    from fastreid.modeling import build_model

    local = cfg.clone()
    local.MODEL.DEVICE = "cpu"
    local.MODEL.BACKBONE.PRETRAIN = False
    return build_model(local)


def describe(cfg: Any) -> str:
    """A short architecture label for the table, e.g. 'Baseline R50 IBN NL, GeM-P'."""
    bb, hd = cfg.MODEL.BACKBONE, cfg.MODEL.HEADS
    name = {"build_resnet_backbone": "R", "build_resnest_backbone": "S", "build_vit_backbone": "ViT-"}.get(
        bb.NAME, bb.NAME + " ")
    depth = str(bb.DEPTH).rstrip("x")
    parts = [f"{name}{depth}"] + [flag for flag, on in (("IBN", bb.WITH_IBN), ("SE", bb.WITH_SE),
                                                         ("NL", bb.WITH_NL)) if on]
    return f"{cfg.MODEL.META_ARCHITECTURE} {' '.join(parts)}, {hd.POOL_LAYER}"


@dataclass
class Trained:
    """A fast-reid training output on disk and fast-reid's eval features for the parity images."""

    root: Path
    config: Path
    weights: Path
    images: list[Path]
    reference: np.ndarray
    model: Any
    height: int
    width: int
    label: str


def make_training_output(entry: dict[str, Any], root: Path, seed: int = SEED) -> Trained:
    """Steps 1-4 of the module docstring, in ``root`` (logs/<config>/config.yaml + model_final.pth)."""
    import torch
    from fastreid.solver import build_lr_scheduler, build_optimizer
    from fastreid.utils.checkpoint import Checkpointer
    from PIL import Image

    from reidbuild.testing import make_trained_like, person_like_images

    cfg = training_cfg(entry)
    h, w = (int(v) for v in cfg.INPUT.SIZE_TEST)
    model = cpu_model(cfg)
    make_trained_like(model, person_like_images(BN_IMAGES, h, w, seed=seed), seed=seed)
    out = root / cfg.OUTPUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.dump())  # engine.defaults.default_setup / auto_scale_hyperparams
    optimizer, _ = build_optimizer(cfg, model)
    schedulers = build_lr_scheduler(cfg, optimizer, iters_per_epoch=200)
    Checkpointer(model, str(out), optimizer=optimizer, **schedulers).save(
        "model_final", epoch=cfg.SOLVER.MAX_EPOCH - 1, metric=0.9)  # PeriodicCheckpointer's last save
    pixels = np.rint(person_like_images(PARITY_IMAGES, h, w, seed=seed + 1000)).astype(np.uint8)
    images = []
    for i, img in enumerate(pixels):
        images.append(root / "images" / f"p{i}.png")
        images[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(images[-1])  # exactly HxW: reidbuild's resize is a no-op
    with torch.no_grad():
        reference = model.eval()(torch.from_numpy(pixels.astype(np.float32))).numpy()
    return Trained(root, out / "config.yaml", out / "model_final.pth", images, reference, model, h, w, describe(cfg))


def mean_cosine_between_images(features: np.ndarray) -> float:
    """Mean cosine over pairs of different images: near 1 means the features cannot tell images apart."""
    from reidbuild.testing import feature_cosines

    cos = feature_cosines(features)
    return float(cos[~np.eye(len(cos), dtype=bool)].mean())


def write_manifest(t: Trained, extra_source: str = "", extra_parity: str = "") -> Path:
    """A manifest for ``t``: ONNX + Caffe (stock Caffe dialect), parity on onnxruntime and Caffe
    (``extra_*``: more lines for the source / parity sections, indented by two spaces)."""
    rel = lambda p: p.relative_to(t.root).as_posix()
    path = t.root / "reidbuild.yml"
    path.write_text(f"""\
version: 1
name: model
source:
  format: fastreid
  config: {rel(t.config)}
  weights: {rel(t.weights)}
{extra_source}input:
  height: {t.height}
  width: {t.width}
output_dir: out
targets:
  onnx: {{opset: 17, simplify: true}}
  caffe: {{dialect: bvlc}}
parity:
  images: images/*.png
  backends: [onnxruntime, caffe]
{extra_parity}""")
    return path


def run_apply(manifest: Path) -> tuple[int, str]:
    """``reidbuild apply`` in-process; (exit code, the last 'error:' line or '')."""
    from click.testing import CliRunner

    from reidbuild.cli import main

    result = CliRunner().invoke(main, ["apply", str(manifest)], catch_exceptions=False)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(("error:", "internal error:"))]
    return result.exit_code, (lines[-1] if lines else "")


def stage_status(manifest: Path) -> dict[str, str]:
    """Each stage's status in the lock apply wrote ({} when it wrote none)."""
    from reidbuild import lockfile

    lock = lockfile.read(manifest.with_suffix(".lock"))
    return {} if lock is None else {name: rec.status for name, rec in lock.stages.items()}


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def compare(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Artifact features vs fast-reid's: max |diff| of L2-normalised features, min cosine, raw max |diff|
    relative to the reference's largest magnitude."""
    a, b = _normalised(reference), _normalised(got)
    return {"max_abs_normalised": float(np.abs(a - b).max()),
            "min_cosine": float((a * b).sum(axis=1).min()),
            "max_abs_relative": float(np.abs(reference - got).max() / max(np.abs(reference).max(), 1e-30))}


def passes(m: dict[str, float]) -> bool:
    return m["max_abs_normalised"] <= NORM_ATOL and m["min_cosine"] >= MIN_COSINE


def pixels(t: Trained) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1) for p in t.images])


def onnx_features(t: Trained, out: Path) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[None]})[0] for x in pixels(t)])


def caffe_features(t: Trained, out: Path) -> np.ndarray:
    from reidbuild.backends.caffe import CaffeRunner

    runner = CaffeRunner(out / "model.prototxt", out / "model.caffemodel", "pycaffe", dialect="bvlc")
    return np.concatenate([runner.infer(x[None]) for x in pixels(t)])


def state_dict_differences(t: Trained) -> list[str] | None:
    """Keys/shapes where reidbuild's built-in model differs from fast-reid's (training-only keys aside);
    None when reidbuild has no built-in model for the config."""
    from reidbuild.errors import ConfigError
    from reidbuild.fastreid import build_model, is_training_only, load_config

    try:
        ours = build_model(load_config(t.config)).state_dict()
    except ConfigError:
        return None
    theirs = {k: tuple(v.shape) for k, v in t.model.state_dict().items() if not is_training_only(k)}
    mine = {k: tuple(v.shape) for k, v in ours.items() if not is_training_only(k)}
    diff = [f"{k}: fast-reid {theirs.get(k)} vs reidbuild {mine.get(k)}"
            for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)]
    if list(theirs) != [k for k in mine if k in theirs]:
        diff.append("key order differs")
    return diff


def record(path: Path, data: dict[str, Any]) -> None:
    """One config's result for `make zoo-table` (scripts/zoo_table.py renders them into the README), with the
    reidbuild commit it was measured on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**data, "commit": _commit()}, indent=2, sort_keys=True) + "\n")


@functools.lru_cache(maxsize=1)
def _commit() -> str:
    """``git describe --always --dirty`` of this checkout ('unknown' outside git)."""
    run = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, check=False)
    return run.stdout.strip() or "unknown"
