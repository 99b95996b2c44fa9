"""source.model_code: building the model with the user's own fast-reid (installed package or a fork's folder).

The fork is made here: a copy of the installed fastreid package with a head registered that reidbuild's
built-in architectures do not have. Its checkpoint is written by the fork's own code in a subprocess (as the
user's training would), and the artifacts reidbuild builds from it are compared with the fork's eval output.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reidbuild import lockfile
from reidbuild.cli import main
from tests.zoo import corpus

fastreid = pytest.importorskip("fastreid", reason="needs fast-reid's package: `make test` installs fastreid==1.4.0")

REPO = Path(__file__).resolve().parent.parent
# an R18 fast-reid training config at a small input size (fast to build, export and convert)
R18 = {"MODEL.BACKBONE.DEPTH": "18x", "MODEL.BACKBONE.FEAT_DIM": 512, "MODEL.HEADS.WITH_BNNECK": True,
       "INPUT.SIZE_TEST": [64, 32], "OUTPUT_DIR": "logs/r18", "MODEL.BACKBONE.PRETRAIN": True}
# fp32 noise on trained-like raw features (|feature| up to ~10): the test's own tolerance, stated here
PARITY = "  atol: 1.0e-4\n"

DUAL_POOL_HEAD = '''\
"""A head reidbuild has no built-in equivalent of: average and max pooling concatenated, then a BN neck."""
import torch
import torch.nn.functional as F
from torch import nn

from fastreid.layers import get_norm
from .build import REID_HEADS_REGISTRY


@REID_HEADS_REGISTRY.register()
class DualPoolHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = 2 * cfg.MODEL.BACKBONE.FEAT_DIM
        self.neck = get_norm(cfg.MODEL.HEADS.NORM, dim)
        self.weight = nn.Parameter(torch.zeros(cfg.MODEL.HEADS.NUM_CLASSES, dim))  # the classifier

    def forward(self, features, targets=None):
        pooled = torch.cat([F.adaptive_avg_pool2d(features, 1), F.adaptive_max_pool2d(features, 1)], 1)
        feat = self.neck(pooled)[..., 0, 0]
        if not self.training:
            return feat
        raise NotImplementedError("inference only")
'''


def cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stderr


def make_fork(root: Path) -> Path:
    """A fast-reid 'fork': the installed package copied, plus DualPoolHead registered in its heads."""
    src = Path(fastreid.__file__).resolve().parent
    dst = root / "fastreid"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "modeling" / "heads" / "dual_pool_head.py").write_text(DUAL_POOL_HEAD)
    with open(dst / "modeling" / "heads" / "__init__.py", "a") as f:
        f.write("from .dual_pool_head import DualPoolHead\n")
    return root


def train_with_fork(fork: Path, project: Path, settings: dict) -> corpus.Trained:
    """The fork's training output (config.yaml + model_final.pth) and its eval features, made by the fork's
    code in its own process (this one already imported the installed fastreid)."""
    script = (
        "import json, sys, numpy as np\n"
        f"sys.path.insert(0, {str(fork)!r})\n"
        "import fastreid; assert fastreid.__file__.startswith(sys.path[0]), fastreid.__file__\n"
        "from tests.zoo import corpus\n"
        "from pathlib import Path\n"
        f"t = corpus.make_training_output({{'settings': {settings!r}, 'identities': 20}}, Path({str(project)!r}))\n"
        "np.save(t.root / 'reference.npy', t.reference)\n"
        "print(json.dumps({'config': str(t.config), 'weights': str(t.weights), 'images': [str(p) for p in t.images],"
        " 'h': t.height, 'w': t.width, 'label': t.label}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-2000:]
    d = json.loads(run.stdout.strip().splitlines()[-1])
    return corpus.Trained(project, Path(d["config"]), Path(d["weights"]), [Path(p) for p in d["images"]],
                          np.load(project / "reference.npy"), None, d["h"], d["w"], d["label"])


@pytest.fixture(scope="module")
def fork_project(tmp_path_factory) -> tuple[Path, corpus.Trained]:
    fork = make_fork(tmp_path_factory.mktemp("fork"))
    settings = {**R18, "MODEL.HEADS.NAME": "DualPoolHead"}
    return fork, train_with_fork(fork, tmp_path_factory.mktemp("proj"), settings)


def test_installed_fastreid_builds_the_model(tmp_path: Path) -> None:
    t = corpus.make_training_output({"settings": R18, "identities": 20}, tmp_path)
    assert corpus.mean_cosine_between_images(t.reference) < corpus.MAX_MEAN_COSINE_BETWEEN_IMAGES
    m = corpus.write_manifest(t, extra_source="  model_code: installed\n", extra_parity=PARITY)
    code, err = cli("apply", str(m))
    assert code == 0, err
    load = lockfile.read(m.with_suffix(".lock")).stages["load"]
    mc = load.params["model"]["model_code"]
    assert mc["from"] == "installed" and len(mc["sha256"]) == 64 and mc["py_files"] > 50
    assert Path(load.record["model_code_path"]) == Path(fastreid.__file__).resolve().parent.parent
    for feats in (corpus.onnx_features(t, tmp_path / "out"), corpus.caffe_features(t, tmp_path / "out")):
        assert corpus.passes(corpus.compare(t.reference, feats))


def test_fork_with_custom_head_converts_and_matches_the_fork(fork_project) -> None:
    fork, t = fork_project
    m = corpus.write_manifest(t, extra_source=f"  model_code: {os.path.relpath(fork, t.root)}\n", extra_parity=PARITY)
    code, err = cli("apply", str(m))
    assert code == 0, err
    out = t.root / "out"
    assert corpus.mean_cosine_between_images(t.reference) < corpus.MAX_MEAN_COSINE_BETWEEN_IMAGES
    assert t.reference.shape == (corpus.PARITY_IMAGES, 1024)  # avg + max of 512 channels
    for feats in (corpus.onnx_features(t, out), corpus.caffe_features(t, out)):
        m_ = corpus.compare(t.reference, feats)
        assert corpus.passes(m_), m_
    lock = lockfile.read(m.with_suffix(".lock"))
    assert lock.stages["load"].record["model_code_path"] == str(fork)

    # an edit to the fork's code re-runs the load stage (and what depends on its result)
    before = lock.stages["load"].fingerprint
    head = fork / "fastreid" / "modeling" / "heads" / "dual_pool_head.py"
    head.write_text(head.read_text() + "\n# edited\n")
    code, err = cli("apply", str(m))
    assert code == 0, err
    assert lockfile.read(m.with_suffix(".lock")).stages["load"].fingerprint != before


def test_without_model_code_the_custom_head_is_refused(fork_project) -> None:
    _, t = fork_project
    m = corpus.write_manifest(t, extra_parity=PARITY)
    code, err = cli("apply", str(m))
    assert code == 2
    assert err.count("\n") == 1 and "MODEL.HEADS.NAME='DualPoolHead' is not supported" in err, err


@pytest.mark.parametrize("case", ["missing", "no_package", "import_fails"])
def test_unimportable_model_code_is_one_line_exit_2(fork_project, tmp_path: Path, case: str) -> None:
    _, t = fork_project
    target = tmp_path / "code"
    if case != "missing":
        (target / "fastreid" if case == "import_fails" else target / "other").mkdir(parents=True)
    if case == "import_fails":
        (target / "fastreid" / "__init__.py").write_text("import a_module_that_is_not_there\n")
    m = corpus.write_manifest(t, extra_source=f"  model_code: {target}\n", extra_parity=PARITY)
    lock_before = m.with_suffix(".lock").read_bytes() if m.with_suffix(".lock").exists() else None
    code, err = cli("apply", str(m))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {m}:") and "source.model_code" in err, err
    expected = {"missing": "is not a folder", "no_package": "has no importable fastreid package",
                "import_fails": "No module named 'a_module_that_is_not_there'"}[case]
    assert expected in err, err
    after = m.with_suffix(".lock").read_bytes() if m.with_suffix(".lock").exists() else None
    assert after == lock_before  # nothing half-written
