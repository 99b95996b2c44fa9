"""The PyTorch model's weights spilled to a scratch file while torch's ONNX exporter serialises the model.

Why: the TorchScript exporter's peak is its serialisation (``graph._export_onnx``), which holds the ONNX
ModelProto, its serialised string and the Python bytes made from it - three copies of the weights - next to
the constant-folded parameters it writes (Conv+BatchNorm folded: a fourth) and the model itself (a fifth).
For an R101 that was ~690 MB over the ~430 MB the process held before the export, the whole build's peak.
The model's own tensors are needed only to trace it and fold its constants; after that the exporter writes
what it folded. So once tracing and folding are done, every model tensor the exporter no longer holds is
written to a file in the run's scratch folder and freed. They stay there while the stages that never use the
model run (the self-check, onnx-simplifier, Caffe conversion: one model's size less at each of their peaks)
and are read back, bit for bit, when a stage next asks for the model (``stages.load.model_from``: the
self-check's PyTorch fallback, the parity reference pass). Cost: one write and one read of the weights (an
R50: ~100 MB, a few hundredths of a second each while the file is in the page cache).

The hook point is the exporter's ``_model_to_graph`` (trace + fold, then serialise): torch has no public
callback between the two. Where a torch version lacks it, the export runs as before, unspilled (same bytes,
higher peak); ``tests/test_onnx_spill.py`` fails on such a version so the change is noticed.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..errors import StageFailed

EXPORTER_MODULE = "torch.onnx._internal.torchscript_exporter.utils"
HOOK = "_model_to_graph"
MIN_SPILL_BYTES = 64 << 10  # smaller tensors are not worth a write and a read
NUMPY_DTYPES = frozenset({"torch.float32", "torch.float64", "torch.float16", "torch.int64", "torch.int32",
                          "torch.int16", "torch.int8", "torch.uint8", "torch.bool"})

_PATCH_LOCK = threading.Lock()  # the hook is a module attribute of torch: one spilled export at a time


@dataclass
class Spill:
    """What a spilled export parked: (tensor, shape) in file order, and how many bytes."""

    file: Path
    parked: list[tuple[Any, tuple[int, ...]]] = field(default_factory=list)
    nbytes: int = 0
    hooked: bool = False  # whether the exporter exposed the hook point at all


def exporter_hook() -> Optional[tuple[Any, Callable[..., Any]]]:
    """(module, function) of the exporter's trace-and-fold step, or None where this torch has none."""
    import importlib

    try:
        mod = importlib.import_module(EXPORTER_MODULE)
    except ImportError:
        return None
    fn = getattr(mod, HOOK, None)
    return (mod, fn) if callable(fn) else None


def _owned(t: Any) -> bool:
    """Whether freeing ``t``'s data frees memory (contiguous, its storage's only view, big enough) and its
    bytes go through numpy (a CPU tensor of a numpy dtype)."""
    import torch

    size = t.numel() * t.element_size()
    return bool(t.device.type == "cpu" and str(t.dtype) in NUMPY_DTYPES and t.layout == torch.strided
                and t.is_contiguous() and t.storage_offset() == 0 and size >= MIN_SPILL_BYTES
                and t.untyped_storage().nbytes() == size)


def park(model: Any, keep: set[int], spill: Spill) -> None:
    """Write every owned model tensor whose storage is not in ``keep`` (data pointers the exporter still
    uses) to ``spill.file`` and free it; a tensor is freed only once its bytes are written."""
    import torch

    tensors = list(model.state_dict(keep_vars=True).values())
    seen: dict[int, int] = {}
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        seen[ptr] = seen.get(ptr, 0) + 1
    with open(spill.file, "wb") as f:
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr in keep or seen[ptr] != 1 or not _owned(t):
                continue
            f.write(memoryview(t.detach().numpy()).cast("B"))
            spill.parked.append((t, tuple(t.shape)))
            spill.nbytes += t.numel() * t.element_size()
            t.data = torch.empty(0, dtype=t.dtype)


def restore(spill: Spill) -> None:
    """Read the parked tensors back, in file order, into fresh tensors of their shape and dtype, then remove
    the file. A file that cannot be read back is a StageFailed: the model would be missing weights."""
    import torch

    try:
        if spill.parked:
            with open(spill.file, "rb") as f:
                for t, shape in spill.parked:
                    fresh = torch.empty(shape, dtype=t.dtype)
                    view = fresh.numpy().data.cast("B")
                    if f.readinto(view) != len(view):
                        raise OSError("the file is truncated")
                    t.data = fresh
        spill.file.unlink(missing_ok=True)
    except OSError as exc:
        raise StageFailed(f"could not read back the PyTorch model's weights spilled to {spill.file}: {exc}") from None
    spill.parked.clear()


@contextlib.contextmanager
def weights_spilled(model: Any, folder: Path) -> Iterator[Spill]:
    """During the ``torch.onnx.export`` of ``model`` run inside: once the exporter has traced ``model`` and
    folded its constants, park what it no longer holds in ``folder``. The weights stay parked after the block
    (``restore`` brings them back when the model is next used); they are restored at once if the block fails.
    Other models exported meanwhile are left alone."""
    spill = Spill(folder / "torch_model.weights")
    found = exporter_hook()
    if found is None:
        yield spill
        return
    mod, original = found

    def hooked(*args: Any, **kwargs: Any) -> Any:
        graph, params, out = original(*args, **kwargs)
        if args and args[0] is model:
            park(model, {v.untyped_storage().data_ptr() for v in params.values()}, spill)
        return graph, params, out

    folder.mkdir(parents=True, exist_ok=True)
    with _PATCH_LOCK:
        setattr(mod, HOOK, hooked)
        spill.hooked = True
        try:
            yield spill
        except BaseException:
            restore(spill)
            raise
        finally:
            setattr(mod, HOOK, original)
