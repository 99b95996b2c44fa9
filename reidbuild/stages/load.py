"""Load stage: read the fast-reid config and checkpoint, build the PyTorch model, record what was built."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..manifest import LoadedManifest, RandomSource
from ..pipeline import Stage, StageContext, StageResult
from . import ArtifactRef, probe_for

STAGE = "load"


def model_config(lm: LoadedManifest) -> dict[str, Any]:
    """The resolved fast-reid config, read by the model source the manifest chose."""
    from .. import modelsource

    return modelsource.config(lm)


def build_torch_model(lm: LoadedManifest, cfg: dict[str, Any]) -> Any:
    """The reference PyTorch model: the manifest's model source with the checkpoint's (or seeded) weights."""
    from .. import modelsource
    from ..fastreid.checkpoint import init_random, load_weights

    model = modelsource.build(lm, cfg)
    weights = lm.model.source.weights
    if isinstance(weights, RandomSource):
        init_random(model, weights.random.seed)
    else:
        load_weights(model, lm.resolve(weights))
    return model.eval()


def model_from(ctx: StageContext, lm: LoadedManifest, cfg: dict[str, Any]) -> Any:
    """The PyTorch model, built once per run whichever stage asks first."""
    return ctx.cached("torch_model", lambda: build_torch_model(lm, cfg))


def release_model(ctx: StageContext) -> None:
    """Drop the run's PyTorch model (a few hundred MB for an R50) once no later stage needs it.

    Parity stages run last and share one reference pass, so after that pass only a stage asking again (none
    does today) would rebuild it.
    """
    ctx.cache.pop("torch_model", None)  # a module tree holds no reference cycles: freed right here


def load_stage(lm: LoadedManifest, probe_paths: Optional[Sequence[Path]] = None) -> tuple[Stage, ArtifactRef, dict[str, Any]]:
    """Validates the config now (plan time) so config errors surface before any work.

    The built model must give finite features on the self-check images (``probe_paths``, the first parity
    images, or person-like images): a model that gives NaN/Inf on realistic input is the checkpoint's problem
    (exit 2), named here once instead of blamed on every later tool. A blank or noise image proves nothing:
    GeM pooling and non-local blocks may overflow on it in PyTorch itself.
    """
    from .. import modelsource
    from ..fastreid.config import check_input_size

    cfg = model_config(lm)
    model_params = modelsource.params(lm, cfg)
    src = lm.model.source
    check_input_size(cfg, lm.model.input.height, lm.model.input.width, str(lm.resolve(src.config)))
    inputs: dict[str, Path] = {"config": lm.resolve(src.config)}
    if isinstance(src.weights, RandomSource):
        weights_param: Any = {"random": {"seed": src.weights.random.seed}}
    else:
        inputs["weights"] = lm.resolve(src.weights)
        weights_param = "checkpoint"  # its sha256 is in the inputs
    out = f"{lm.model.name}.fastreid.json"
    h, w = lm.model.input.height, lm.model.input.width

    def run(ctx: StageContext) -> StageResult:
        import numpy as np

        from ..backends.torch import TorchRunner
        from ..selfcheck import nonfinite_rows

        model = model_from(ctx, lm, cfg)
        probe = probe_for(ctx, lm.model.input, probe_paths)
        feat = np.asarray(TorchRunner(model).infer(probe.images))
        bad = nonfinite_rows(feat) if feat.ndim == 2 else list(range(len(feat)))
        if bad:
            from ..errors import CheckpointError

            raise CheckpointError(f"{src.weights}: the model gives non-finite features (NaN/Inf) in PyTorch on "
                                  f"{probe.names[bad[0]]} ({len(bad)} of {len(feat)} {probe.source}): the "
                                  "checkpoint or config is broken, no conversion can fix that")
        weights = ctx.inputs["weights"]["sha256"] if "weights" in ctx.inputs else weights_param
        summary = {"model": model_params, "weights": weights, "feature_dim": int(feat.shape[1]),
                   "parameters": int(sum(p.numel() for p in model.parameters())),
                   "state_dict_keys": len(model.state_dict())}
        data = (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
        return StageResult({out: data}, {"feature_dim": summary["feature_dim"], "parameters": summary["parameters"],
                                         **modelsource.facts(lm)})

    stage = Stage(name=STAGE, run=run, params={"model": model_params, "weights": weights_param, "input": [h, w]},
                  inputs=inputs, outputs=(out,), tools=("torch",),
                  description="build the fast-reid model from config + checkpoint")
    return stage, ArtifactRef(STAGE, out), cfg
