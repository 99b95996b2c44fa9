"""Load stage: build the reference PyTorch model from the manifest's model source, record what was built."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..manifest import LoadedManifest
from ..pipeline import Stage, StageContext, StageResult
from ..sources import ModelSource
from . import ArtifactRef, probe_for
from .spill import Spill, restore

STAGE = "load"


SPILL_KEY = "torch_model_spill"


def model_from(ctx: StageContext, source: ModelSource) -> Any:
    """The PyTorch model, built once per run whichever stage asks first; weights parked on disk by
    ``park_model`` are read back first."""
    model = ctx.cached("torch_model", source.build_model)
    spill = ctx.cache.pop(SPILL_KEY, None)
    if spill is not None:
        restore(spill)
    return model


def park_model(ctx: StageContext, spill: Spill) -> None:
    """Record that the run's model has weights parked in ``spill`` (``stages.spill``) until it is next asked
    for: the stages in between (simplify, Caffe conversion) then run without it in memory."""
    ctx.cache[SPILL_KEY] = spill


def release_model(ctx: StageContext) -> None:
    """Drop the run's PyTorch model (a few hundred MB for an R50) once no later stage needs it.

    Parity stages run last and share one reference pass, so after that pass only a stage asking again (none
    does today) would rebuild it.
    """
    ctx.cache.pop("torch_model", None)  # a module tree holds no reference cycles: freed right here
    spill = ctx.cache.pop(SPILL_KEY, None)
    if spill is not None:
        spill.file.unlink(missing_ok=True)


def load_stage(lm: LoadedManifest, source: ModelSource,
               probe_paths: Optional[Sequence[Path]] = None) -> tuple[Stage, ArtifactRef]:
    """The source's fingerprint and input-size check happen now (plan time), so their errors surface before
    any work.

    The built model must give finite features on the self-check images (``probe_paths``, the first parity
    images, or person-like images): a model that gives NaN/Inf on realistic input is the checkpoint's problem
    (exit 2), named here once instead of blamed on every later tool. A blank or noise image proves nothing:
    GeM pooling and non-local blocks may overflow on it in PyTorch itself.
    """
    params = source.params()
    h, w = lm.model.input.height, lm.model.input.width
    source.check_input(h, w)
    inputs = source.inputs()
    out = f"{lm.model.name}.{source.format}.json"

    def run(ctx: StageContext) -> StageResult:
        import numpy as np

        from ..backends.torch import TorchRunner
        from ..selfcheck import nonfinite_rows

        model = model_from(ctx, source)
        probe = probe_for(ctx, lm.model.input, probe_paths)
        feat = np.asarray(TorchRunner(model).infer(probe.images))
        bad = nonfinite_rows(feat) if feat.ndim == 2 else list(range(len(feat)))
        if bad:
            from ..errors import CheckpointError

            raise CheckpointError(f"{source.checkpoint()}: the model gives non-finite features (NaN/Inf) in "
                                  f"PyTorch on {probe.names[bad[0]]} ({len(bad)} of {len(feat)} {probe.source}): "
                                  "the checkpoint or config is broken, no conversion can fix that")
        summary = {**params, "feature_dim": int(feat.shape[1]),
                   "parameters": int(sum(p.numel() for p in model.parameters())),
                   "state_dict_keys": len(model.state_dict())}
        if "weights" in ctx.inputs:  # the checkpoint itself, by its hash
            summary["weights"] = ctx.inputs["weights"]["sha256"]
        data = (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
        return StageResult({out: data}, {"feature_dim": summary["feature_dim"], "parameters": summary["parameters"],
                                         **source.facts()})

    stage = Stage(name=STAGE, run=run, params={**params, "input": [h, w]}, inputs=inputs, outputs=(out,),
                  tools=source.tools, description=source.description)
    return stage, ArtifactRef(STAGE, out)
