"""Load fast-reid checkpoints safely and exactly; make seeded weights and test checkpoints.

Loading is strict on purpose: a deploy tool that silently skips a mismatched tensor (as
fast-reid's own Checkpointer does, with a log line) ships a model that produces
plausible-looking but wrong features.  Only keys that are training-only by construction
are skipped, by name.  Files are read with ``torch.load(weights_only=True)`` so a
checkpoint from an untrusted source can never run code.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .layers import GeneralizedMeanPoolingP

# Keys a fast-reid checkpoint may carry that inference never uses (HEAD: ``heads``, or MGN's ``b1_head``..``b33_head``).
#  HEAD.weight          classifier matrix of every CLS_LAYER (Linear, ArcSoftmax, CircleSoftmax, CosSoftmax) since v1.1
#  HEAD.classifier.*    the classifier module of v0.3-v1.0 (weight, and ArcSoftmax's buffer ``t``)
#  HEAD.cls_layer.*     the v1.1+ margin layer (no tensors today; skipped should one appear)
#  *num_batches_tracked  BatchNorm step counters
_TRAINING_ONLY = re.compile(r"(heads|b[1-3]{1,2}_head)\.(weight|classifier\..+|cls_layer\..+)")
_COUNTER_SUFFIX = "num_batches_tracked"
# Persistent buffers in fast-reid <= v1.0, config-derived since; checked, not loaded.
_PIXEL_BUFFERS = ("pixel_mean", "pixel_std")

_SHOWN = 6  # keys listed per category in an error message
_ATTENTION_GAIN = 0.1  # Non-local g/theta/phi weight scale vs He init: their product is cubic in the input
_DAMPED_BN = (0.05, 0.2)  # weight range of the norm ending a residual branch (limits growth with depth)


def is_training_only(key: str) -> bool:
    """True for checkpoint keys that only training uses (skipped when loading)."""
    return _TRAINING_ONLY.fullmatch(key) is not None or key.rsplit(".", 1)[-1] == _COUNTER_SUFFIX


# --------------------------------------------------------------------------- loading


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a fast-reid checkpoint into ``model``; every inference tensor must be present and fit.

    Accepts fast-reid's Checkpointer format (``{"model": state_dict, "optimizer": ..., ...}``)
    or a bare state_dict, with or without a DataParallel ``module.`` prefix.  Raises
    :class:`CheckpointError` (one line, naming the file) for anything else.
    """
    path = Path(path)
    state = _extract_state(_safe_load(path), path)
    state = _strip_prefix(state, "module.")
    _check_tensors(state, path)

    expected = model.state_dict()
    _check_pixel_buffers(model, state, path)
    missing = [k for k in expected if k not in state and not is_training_only(k)]
    unexpected = [k for k in state if k not in expected and not is_training_only(k) and k not in _PIXEL_BUFFERS]
    wrong_shape = [
        f"{k} {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and not is_training_only(k) and state[k].shape != v.shape
    ]
    wrong_dtype = [
        f"{k} {state[k].dtype}"
        for k, v in expected.items()
        if k in state and not is_training_only(k) and v.is_floating_point() and not state[k].is_floating_point()
    ]
    problems = [
        _listing("missing", missing),
        _listing("unexpected", unexpected),
        _listing("wrong shape", wrong_shape),
        _listing("not floating point", wrong_dtype),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not fit the model built from the config: {'; '.join(problems)}")

    full: dict[str, torch.Tensor] = {}
    for key, current in expected.items():
        if key in state and not (is_training_only(key) and state[key].shape != current.shape):
            full[key] = state[key]
        else:
            full[key] = current  # a training-only counter the checkpoint lacks: keep the model's
    try:
        model.load_state_dict(full, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:  # pragma: no cover - guarded by the checks above
        raise CheckpointError(f"{path}: weights could not be copied into the model ({_first_line(exc)})") from None


def _safe_load(path: Path) -> Any:
    try:
        if not path.exists():
            raise CheckpointError(f"{path}: checkpoint file not found")
        if not path.is_file():
            raise CheckpointError(f"{path}: is not a file, expected a fast-reid checkpoint (.pth)")
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: checkpoint file is empty")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot access checkpoint ({exc.strerror or exc.__class__.__name__})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only load failed" in text.lower() or "weightsunpickler" in text.lower():
            raise CheckpointError(
                f"{path}: refused as unsafe by torch.load(weights_only=True) ({_unpickler_reason(text)}); "
                "the pickle was NOT executed - re-save the checkpoint with plain tensors/dicts only if you trust it"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt pickle: {_first_line(exc)})") from None
    except RuntimeError as exc:
        text = str(exc)
        if "zip archive" in text or "PytorchStreamReader" in text or "archive is corrupted" in text:
            raise CheckpointError(f"{path}: checkpoint is corrupt or truncated (incomplete zip archive)") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    except EOFError:
        raise CheckpointError(f"{path}: checkpoint is truncated (unexpected end of file)") from None
    except MemoryError:
        raise CheckpointError(f"{path}: checkpoint could not be loaded (out of memory)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror or exc.__class__.__name__})") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for garbage input
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint or corrupt ({exc.__class__.__name__}: {_first_line(exc)})"
        ) from None


def _unpickler_reason(text: str) -> str:
    """The one informative line of torch's long weights_only refusal message."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            detail = line[len("WeightsUnpickler error:"):].strip()
            if detail:
                return detail.split(" was not an allowed global")[0]
    for line in text.splitlines():
        if line.strip().startswith(("Unsupported", "Trying to")):
            return line.strip()
    return "it contains objects other than tensors and plain containers"


def _extract_state(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: top level is a {type(obj).__name__}, expected fast-reid's {{'model': state_dict, ...}} or a state_dict"
        )
    if "model" in obj:
        state = obj["model"]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: 'model' entry is a {type(state).__name__}, expected a state_dict (name -> tensor)")
        where = "'model'"
    elif any(isinstance(v, torch.Tensor) for v in obj.values()):
        state, where = obj, "state_dict"
    else:
        keys = ", ".join(repr(k) for k in list(obj)[:_SHOWN]) or "none"
        raise CheckpointError(
            f"{path}: unrecognised layout (top-level keys: {keys}); expected fast-reid's {{'model': state_dict, ...}} "
            "or a bare state_dict"
        )
    if not state:
        raise CheckpointError(f"{path}: the {where} state_dict is empty")
    bad_keys = [repr(k) for k in state if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{path}: state_dict keys must be strings; {_listing('bad keys', bad_keys)}")
    return dict(state)


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Drop a DataParallel prefix when every key has it (as fast-reid's Checkpointer does)."""
    if all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _check_tensors(state: dict[str, Any], path: Path) -> None:
    not_tensor = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensor:
        raise CheckpointError(f"{path}: state_dict values must be tensors; {_listing('non-tensor', not_tensor)}")
    odd = [k for k, v in state.items() if v.layout != torch.strided or v.is_meta or v.is_quantized]
    if odd:
        raise CheckpointError(f"{path}: only dense, materialised tensors can be loaded; {_listing('unusable', odd)}")
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise CheckpointError(f"{path}: weights contain NaN or Inf; {_listing('non-finite', non_finite)}")


def _check_pixel_buffers(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Old checkpoints store the normalisation; it must agree with the config's MODEL.PIXEL_*."""
    for name in _PIXEL_BUFFERS:
        if name not in state:
            continue
        ours = getattr(model, name, None)
        theirs = state[name]
        if not isinstance(ours, torch.Tensor):
            raise CheckpointError(f"{path}: checkpoint has {name} but the model has no such buffer")
        if theirs.numel() != ours.numel() or not torch.allclose(
            theirs.reshape(-1).double(), ours.reshape(-1).double(), rtol=1e-5, atol=1e-3
        ):
            config_key = "MODEL.PIXEL_MEAN" if name == "pixel_mean" else "MODEL.PIXEL_STD"
            raise CheckpointError(
                f"{path}: checkpoint's {name} {_fmt(theirs)} differs from the config's {config_key} {_fmt(ours)}; "
                "use the config the model was trained with"
            )


# --------------------------------------------------------------------------- random init


def init_random(model: nn.Module, seed: int) -> None:
    """Fill every parameter and buffer (except the config's pixel_mean/pixel_std) with seeded values.

    Used to exercise the pipeline without a trained checkpoint, so the values must make a
    numerically sane network: He-scaled convolutions, BN running_var in [0.5, 1.5] and
    small running means, and a damped last BN in each residual branch so a 101-layer
    ResNet's activations stay of order one.  Each tensor gets its own generator seeded from
    ``(seed, name)``, so results are bit-identical across runs and independent of module order.
    """
    residual_ends, attention_projections = _special_modules(model)
    with torch.no_grad():
        for prefix, module in model.named_modules():
            for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                full = f"{prefix}.{name}" if prefix else name
                if full in _PIXEL_BUFFERS:
                    continue
                gen = torch.Generator().manual_seed(_derived_seed(seed, full))
                gain = _ATTENTION_GAIN if prefix in attention_projections else 1.0
                tensor.copy_(_random_value(module, name, tensor, gen, damped=prefix in residual_ends, gain=gain))


def _derived_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _uniform(tensor: torch.Tensor, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=torch.float32).uniform_(low, high, generator=gen).to(tensor.dtype)


def _normal(tensor: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(tensor.dtype)


def _random_value(module: nn.Module, name: str, tensor: torch.Tensor, gen: torch.Generator,
                  damped: bool, gain: float) -> torch.Tensor:
    if not tensor.is_floating_point():
        return torch.zeros_like(tensor)  # BN step counters: irrelevant at inference
    if isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm)):
        if name == "weight":
            return _uniform(tensor, *_DAMPED_BN, gen) if damped else _uniform(tensor, 0.6, 1.2, gen)
        if name == "bias":
            return _uniform(tensor, -0.1, 0.1, gen)
        if name == "running_mean":
            return _uniform(tensor, -0.1, 0.1, gen)
        if name == "running_var":
            return _uniform(tensor, 0.5, 1.5, gen)
    if isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight":
        fan_in = tensor[0].numel()
        return _normal(tensor, gain * (2.0 / fan_in) ** 0.5, gen)
    if isinstance(module, (nn.Conv2d, nn.Linear)) and name == "bias":
        return _uniform(tensor, -0.05, 0.05, gen)
    if isinstance(module, GeneralizedMeanPoolingP) and name == "p":
        return _uniform(tensor, 2.5, 3.5, gen)
    return _normal(tensor, 0.02, gen)  # anything new: small values rather than garbage


def _special_modules(model: nn.Module) -> tuple[set[str], set[str]]:
    """Norms that end a residual branch (bn2 of BasicBlock, bn3 of Bottleneck, W.1 of Non-local),
    and Non-local's g/theta/phi, whose product is cubic in the input scale and so needs small weights.
    """
    from .layers import NonLocal
    from .resnest import Bottleneck as SplitBottleneck
    from .resnet import BasicBlock, Bottleneck

    ends: set[str] = set()
    projections: set[str] = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, (Bottleneck, SplitBottleneck)):
            ends.add(f"{dot}bn3")
        elif isinstance(module, BasicBlock):
            ends.add(f"{dot}bn2")
        elif isinstance(module, NonLocal):
            ends.add(f"{dot}W.1")
            projections.update(f"{dot}{name}" for name in ("g", "theta", "phi"))
    return ends, projections


# --------------------------------------------------------------------------- writing


def make_checkpoint(model: nn.Module, path: Path, *, with_training_extras: bool = True,
                    num_classes: int | None = None, seed: int = 0) -> None:
    """Write ``model``'s weights in fast-reid's on-disk layout (what ``Checkpointer.save`` writes).

    With ``with_training_extras`` the file is what fast-reid v1.x training leaves behind
    (``model_final.pth``): ``{"model", "optimizer", "lr_sched", "warmup_sched", "epoch",
    "metric"}``, and the model dict also holds each head's classifier (``heads.weight``, MGN's
    ``b1_head.weight`` ..) [num_classes, D] next to the inference weights.  Without it: ``{"model": state_dict}``.
    """
    path = Path(path)
    state: OrderedDict[str, torch.Tensor] = OrderedDict(
        (k, v.detach().clone()) for k, v in model.state_dict().items()
    )
    data: dict[str, Any]
    if with_training_extras:
        classes = num_classes if num_classes is not None else (getattr(model, "num_classes", 0) or 751)
        from .head import EmbeddingHead

        # one classifier per head (Baseline: ``heads``; MGN: ``b1_head`` .. ``b33_head``), before its children
        heads = [(name, mod.out_dim) for name, mod in model.named_modules() if isinstance(mod, EmbeddingHead)]
        for name, width in heads:
            gen = torch.Generator().manual_seed(_derived_seed(seed, f"{name}.weight"))
            classifier = torch.empty(classes, width).normal_(0.0, 0.01, generator=gen)
            state = _insert_before_prefix(state, f"{name}.", f"{name}.weight", classifier)
        groups = len(list(model.named_parameters())) + len(heads)
        data = {
            "model": state,
            "optimizer": _adam_state(model, groups),
            "lr_sched": {
                "T_max": 110, "eta_min": 7.7e-7, "base_lrs": [3.5e-4] * groups,
                "last_epoch": 110, "_step_count": 111, "_get_lr_called_within_step": False,
                "_last_lr": [7.7e-7] * groups,
            },
            "warmup_sched": {
                "warmup_factor": 0.1, "warmup_iters": 2000, "warmup_method": "linear",
                "base_lrs": [3.5e-4] * groups, "last_epoch": 2000, "_step_count": 2001,
                "_get_lr_called_within_step": False, "_last_lr": [3.5e-4] * groups,
            },
            "epoch": 119,
            "metric": 0.8765,
        }
    else:
        data = {"model": state}
    try:
        torch.save(data, path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint ({exc.strerror or exc.__class__.__name__})") from None


def _insert_before_prefix(state: OrderedDict[str, torch.Tensor], prefix: str, key: str,
                          value: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    """fast-reid's heads.weight is the head's own parameter, so it precedes the head's children."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        if key not in out and k.startswith(prefix):
            out[key] = value
        out[k] = v
    if key not in out:
        out[key] = value
    return out


def _adam_state(model: nn.Module, n_params: int) -> dict[str, Any]:
    """An Adam state_dict shaped like fast-reid's (one group per parameter), moments for the first few only."""
    params = [p for _, p in model.named_parameters()]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, param in enumerate(params[:2]):
        state[index] = {
            "step": torch.tensor(26160.0),
            "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param),
        }
    groups = [
        {
            "lr": 7.7e-7, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0005, "amsgrad": False,
            "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
            "initial_lr": 3.5e-4, "params": [index],
        }
        for index in range(n_params)
    ]
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- messages


def _listing(label: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:_SHOWN])
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{len(items)} {label}: {shown}{more}"


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in t.reshape(-1).tolist()[:4]) + "]"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else exc.__class__.__name__
