"""Parity stages: prove each backend computes the PyTorch model's features on real images.

One stage per check (``parity.onnxruntime``, ``parity.onnx_int8``, ``parity.caffe``, ...), so editing one
target re-runs only its own proof. A failing check is recorded as failed in the lock (with the smallest
rtol/atol that would have passed) and exits 1. The comparison mode (``parity.compare``, per check
``overrides.<check>.compare``) is a parameter of the stage and is recorded with its result.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # numpy is imported where it is used: planning (a no-op apply) never needs it
    import numpy as np

from .. import featurefile
from ..backends.base import Runner, run_batched
from ..compare import FP32_TOLERANCE, TOLERANCE_KEYS, compare
from ..manifest import LoadedManifest
from ..pipeline import Stage, StageContext, StageResult
from ..sources import ModelSource
from . import ArtifactRef
from .load import model_from, release_model


@dataclass
class ParityCheck:
    """One backend artifact to prove against the reference."""

    check: str  # onnxruntime | caffe | tensorrt | onnx_fp16 | onnx_int8 | onnx_int8_cpu
    artifacts: list[ArtifactRef]
    make_runner: Callable[[StageContext], Runner]
    profile: dict[str, Any]  # default tolerances for this check (before manifest overrides)
    available: Optional[Callable[[], Optional[str]]] = None
    output_transforms: list[str] = field(default_factory=list)  # declared by graph patches (changes_output)


RETRIEVAL_KEYS = ("min_rank1", "min_topk_overlap")


def tolerance_for(lm: LoadedManifest, check: ParityCheck, n_images: int = 3) -> dict[str, Any]:
    """Profile defaults, then the manifest's parity section (for fp32 checks), then per-check overrides.

    Retrieval agreement needs three images; with fewer, the profile's retrieval thresholds are dropped (an
    override that asks for them still fails, saying why)."""
    tol = {k: check.profile.get(k) for k in TOLERANCE_KEYS}
    if n_images < 3:
        tol.update({k: None for k in RETRIEVAL_KEYS})
    override = lm.model.parity.overrides.get(check.check) if lm.model.parity else None
    if override is not None:
        tol.update({k: v for k, v in override.model_dump().items() if v is not None and k in TOLERANCE_KEYS})
    return tol


def mode_for(lm: LoadedManifest, check: ParityCheck) -> str:
    """What rtol/atol compare: the check's override, else ``parity.compare`` (default normalized)."""
    parity = lm.model.parity
    assert parity is not None
    override = parity.overrides.get(check.check)
    return override.compare if override is not None and override.compare else parity.compare


def fp32_profile(lm: LoadedManifest) -> dict[str, Any]:
    """The fp32 defaults with the parity section's rtol/atol (and min_cosine when given)."""
    p = lm.model.parity
    assert p is not None
    tol = dict(FP32_TOLERANCE)
    tol.update({"rtol": p.rtol, "atol": p.atol})
    if p.min_cosine is not None:
        tol["min_cosine"] = p.min_cosine
    return tol


def apply_transforms(features: np.ndarray, transforms: list[str]) -> np.ndarray:
    """Apply to the reference what graph patches declared they do to the output (e.g. l2_normalize)."""
    import numpy as np

    from ..patches import apply_output_transform

    for t in transforms:
        features = apply_output_transform(t, features)
    return np.asarray(features, dtype=np.float32)


def _float_environment() -> dict[str, str]:
    """What the feature file's last bits depend on beyond the fingerprint's tool versions (the shared cache
    restores a check's result only onto the same kind of machine)."""
    import platform

    return {"machine": platform.machine(), "system": platform.system()}


def features_file_name(model_name: str, check: str) -> str:
    """``<name>.parity.<check>.npz``: the reference and backend features the check compared (for the report)."""
    return f"{model_name}.parity.{check}.npz"


def reference_features(ctx: StageContext, source: ModelSource, batch: np.ndarray,
                       batch_size: int) -> np.ndarray:
    """The PyTorch model's features on the parity images (one pass per run, shared by every check)."""
    from ..backends.torch import TorchRunner
    from ..heap import reusing_heap

    # one heap reuse for all batches: each batch reuses the pages the previous one faulted in
    with TorchRunner(model_from(ctx, source)) as runner, reusing_heap():
        return run_batched(runner, batch, batch_size, lambda d, t: ctx.progress("PyTorch reference images", d, t))


def parity_stage(lm: LoadedManifest, source: ModelSource, load: ArtifactRef, check: ParityCheck,
                 images: list[Path]) -> Stage:
    parity = lm.model.parity
    assert parity is not None
    inp = lm.model.input
    tol = tolerance_for(lm, check, len(images))
    mode = mode_for(lm, check)
    preprocess = {"height": inp.height, "width": inp.width, "color": inp.color,
                  "interpolation": inp.interpolation, "layout": "NCHW float32 0..255"}
    names = [p.name for p in images]
    features_file = features_file_name(lm.model.name, check.check)

    def run(ctx: StageContext) -> StageResult:
        from ..images import load_images

        batch = ctx.cached("parity_images", lambda: load_images(images, inp.height, inp.width, inp.color,
                                                                inp.interpolation))
        raw_ref = ctx.cached("parity_reference", lambda: reference_features(ctx, source, batch, parity.batch_size))
        release_model(ctx)  # every parity check shares the one reference pass above
        reference = apply_transforms(raw_ref, check.output_transforms)
        with check.make_runner(ctx) as runner:  # closed after the last batch: sessions and engines go now
            actual = run_batched(runner, batch, parity.batch_size,
                                 lambda d, t: ctx.progress(f"{check.check} images", d, t))
            backend = runner.describe()
        result = compare(reference, actual, tol, mode)
        record = {"backend": backend, "reference": "torch", "transforms": check.output_transforms,
                  **result.summary(),
                  "per_image": [{"image": names[r.index], "max_abs": float(f"{r.max_abs:.4g}"),
                                 "cosine": float(f"{r.cosine:.8f}"), "ok": r.ok} for r in result.images]}
        failed = None
        if not result.passed:
            hint = result.suggestion_text()
            from ..selfcheck import nonfinite_rows

            own = [names[i] for i in nonfinite_rows(raw_ref)]
            if own:  # the model's own behaviour: no backend can be blamed for it
                hint = (f"PyTorch itself gives non-finite features on {own[0]}"
                        + (f" and {len(own) - 1} more image(s)" if len(own) > 1 else "")
                        + ": the model's own behaviour, not the backend's" + ("\n" + hint if hint else ""))
            failed = (f"parity {check.check}: " + "; ".join(result.failures) + ("\n" + hint if hint else "")
                      + "\n" + result.table(names))
        runtime = backend.get("runtime", runner.name)
        retrieval = (f", rank-1 {result.rank1:.3f}, top-{result.topk} {result.topk_overlap:.3f}"
                     if result.rank1 is not None else "")
        ctx.log(f"{runtime}: {mode} max_abs {result.max_abs:.3g}, max_rel {result.max_rel:.3g}, "
                f"min_cosine {result.min_cosine:.8f}" + retrieval)
        # the verdict and tolerances travel with the features, so the report (which depends on this file)
        # is rebuilt when either changes
        verdict = json.dumps({"tolerance": tol, "compare": mode, "passed": result.passed}, sort_keys=True)
        import numpy as np

        features = featurefile.dumps({"reference": reference, "actual": actual, "images": np.array(names),
                                      "verdict": np.array(verdict)})
        return StageResult({features_file: features}, record, failed)

    def equivalent(locked: Path, rebuilt: Path) -> Optional[str]:
        """Rebuilt features within the check's tolerances of the locked ones, with the same verdict."""
        a, b = featurefile.load(locked / features_file), featurefile.load(rebuilt / features_file)
        if str(a.get("verdict")) != str(b.get("verdict")):
            return f"{features_file}: the check's verdict differs ({a.get('verdict')} vs {b.get('verdict')})"
        for key in ("reference", "actual"):
            result = compare(a[key], b[key], tol, mode)
            if not result.passed:
                return f"{features_file}: {key} features moved: " + "; ".join(result.failures)
        return None

    inputs = {f"image[{i:03d}]": p for i, p in enumerate(images)}
    deps = tuple(dict.fromkeys([load.stage] + [a.stage for a in check.artifacts]))
    return Stage(f"parity.{check.check}", run,
                 params={"tolerance": tol, "compare": mode, "preprocess": preprocess, "transforms": check.output_transforms,
                         "batch_size": parity.batch_size, "reference": parity.reference},
                 inputs=inputs, deps=deps, outputs=(features_file,), tools=("torch", "onnxruntime"),
                 available=check.available,
                 # float results may differ in the last bits on another CPU: `apply --locked` does not compare
                 # the feature file's bytes (the check itself is the proof), `verify --rebuild` compares values
                 reproducible=False, equivalent=equivalent, environment=_float_environment,
                 description=f"compare {check.check} features with PyTorch")
