"""Targets are plugins: a toy "copy the ONNX" target registered from this test, with no edit anywhere else, is
accepted by the manifest, planned, proven by parity (onnxruntime on the copy) and offered by ``infer``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from click.testing import CliRunner

from reidbuild import lockfile, targets
from reidbuild.cli import main
from reidbuild.manifest_parts import Strict
from reidbuild.pipeline import Stage, StageContext, StageResult
from reidbuild.stages import output_ref
from reidbuild.targets import Artifact, BackendBuild, Build, RunnerFactory, Target
from reidbuild.targets.onnx import ort_factory
from tests.helpers import tiny_manifest

TOY = """
targets:
  onnx_copy:
    suffix: dup
"""


class CopyTarget(Strict):
    suffix: str = "copy"


OPENED: list[Any] = []  # every runner the toy target's factory made, to check that parity and infer close them


def counted(factory: RunnerFactory) -> RunnerFactory:
    def make(resolve: Callable[[str], Path]) -> Any:
        runner = factory(resolve)
        OPENED.append(runner)
        return runner
    return make


def contribute(build: Build, target: CopyTarget) -> None:
    """One stage copying the final ONNX; onnxruntime runs the copy exactly as it runs the original."""
    onnx = build.artifact("onnx")
    out = f"{build.lm.model.name}.{target.suffix}.onnx"

    def run(ctx: StageContext) -> StageResult:
        return StageResult({out: ctx.artifact(onnx.ref.file).read_bytes()}, {"source": onnx.ref.file})

    stage = build.add(Stage("copy.onnx", run, params={"suffix": target.suffix}, deps=(onnx.ref.stage,),
                            outputs=(out,), description="copy the ONNX model"))
    copy = Artifact(output_ref(stage), onnx.input_layout, onnx.output_transforms)
    build.runner("onnx_copy", BackendBuild([copy.ref], counted(ort_factory(copy, build.lm.model.input.color)),
                                           output_transforms=list(copy.output_transforms)))


@pytest.fixture
def toy() -> Iterator[Target]:
    target = targets.register(Target("onnx_copy", CopyTarget, contribute, backends={"onnx_copy": "fp32"},
                                     requestable=("onnx_copy",), description="a copy of the ONNX model"))
    try:
        yield target
    finally:
        targets.unregister("onnx_copy")


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_the_manifest_knows_a_target_only_while_it_is_registered(tmp_path: Path, toy: Target) -> None:
    m = tiny_manifest(tmp_path, extra=TOY, backends="[onnxruntime, onnx_copy]")
    code, out, err = cli("validate", "--json", str(m))
    assert code == 0, err
    assert "copy.onnx" in json.loads(out)["stages"]
    schema = json.loads(cli("schema")[1])
    assert "CopyTarget" in schema["$defs"] and "onnx_copy" in json.dumps(schema["$defs"]["Parity"])

    undeclared = tiny_manifest(tmp_path / "u", backends="[onnx_copy]")
    code, _, err = cli("validate", str(undeclared))
    assert code == 2 and "parity.backends ['onnx_copy'] are not declared under targets" in err

    targets.unregister("onnx_copy")
    try:
        code, _, err = cli("validate", str(m))
        assert code == 2 and "targets.onnx_copy: unknown key" in err, err
    finally:
        targets.register(toy)


def test_plan_lists_its_stage_and_its_parity_check(tmp_path: Path, toy: Target) -> None:
    m = tiny_manifest(tmp_path, extra=TOY, backends="[onnxruntime, onnx_copy]")
    code, out, err = cli("plan", "--json", str(m))
    assert code == 0, err
    rows = {r["stage"]: r for r in json.loads(out)["stages"]}
    assert rows["copy.onnx"]["outputs"] == ["tiny.dup.onnx"] and rows["copy.onnx"]["stale"]
    assert rows["copy.onnx"]["description"] == "copy the ONNX model"
    order = list(rows)
    assert order.index("onnx.simplify") < order.index("copy.onnx") < order.index("parity.onnx_copy")


def test_parity_runs_it_and_infer_offers_it(tmp_path: Path, toy: Target) -> None:
    """...and both close the runner they made (its onnxruntime session is gone after the run)."""
    m = tiny_manifest(tmp_path, extra=TOY, backends="[onnxruntime, onnx_copy]")
    OPENED.clear()
    code, _, err = cli("apply", str(m))
    assert code == 0, err
    assert len(OPENED) == 1 and OPENED[0].session is None
    lock = lockfile.read(tmp_path / "m.lock")
    assert lock is not None
    rec = lock.stages["parity.onnx_copy"]
    assert rec.status == "ok" and rec.record["passed"] and rec.record["images"] == 5
    assert rec.record["backend"]["runtime"] == "onnxruntime"
    assert (tmp_path / "out" / "tiny.dup.onnx").read_bytes() == (tmp_path / "out" / "tiny.onnx").read_bytes()

    assert "onnx_copy" in cli("infer", "--help")[1]
    feats = {}
    for backend in ("onnx_copy", "onnxruntime"):
        code, _, err = cli("infer", str(m), "--backend", backend, "--input", str(tmp_path / "imgs" / "*.png"),
                           "--output", str(tmp_path / backend))
        assert code == 0, err
        assert all(r.session is None for r in OPENED)
        feats[backend] = np.stack([np.load(p) for p in sorted((tmp_path / backend).glob("*.npy"))])
    assert len(OPENED) == 2 and feats["onnx_copy"].shape == (5, 512)
    np.testing.assert_array_equal(feats["onnx_copy"], feats["onnxruntime"])


def test_the_registry_refuses_a_second_target_of_the_same_name_or_runner(toy: Target) -> None:
    with pytest.raises(ValueError, match="already registered"):
        targets.register(toy)
    with pytest.raises(ValueError, match="belong to another target"):
        targets.register(Target("copy2", CopyTarget, contribute, backends={"onnxruntime": "fp32"}))
    with pytest.raises(ValueError, match="not a usable section name"):
        targets.register(Target("copy", CopyTarget, contribute, backends={"onnx_copy2": "fp32"}))
    assert "onnx_copy" in targets.backend_names()
    assert not {"copy", "copy2"} & {t.name for t in targets.registered()}


def test_builtin_names_come_from_the_registry() -> None:
    """The names the manifest, the CLI and the tolerance profiles used to list by hand."""
    assert targets.backend_names() == ("onnxruntime", "caffe", "tensorrt", "onnx_fp16", "onnx_int8", "onnx_int8_cpu")
    assert targets.requestable_backends() == ("onnxruntime", "caffe", "tensorrt")
    assert [t.name for t in targets.registered()] == ["onnx", "caffe", "tensorrt", "onnx_int8_cpu"]
