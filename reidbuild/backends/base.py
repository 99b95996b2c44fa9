"""The one small interface every inference backend implements (torch, onnxruntime, caffe, tensorrt).

Backends know nothing about manifests: they get artifact paths and float32 NCHW batches
(RGB 0..255 unless a graph patch changed the input), and return float32 [N, D] features.

Runners hold sessions, nets or GPU buffers: they are context managers and ``close()`` releases them. Whoever
makes a runner closes it (parity and ``infer`` use ``with``), so a run never keeps an engine's device
memory or a session's threads after its last batch.
"""
from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:  # numpy is imported where it is used: planning (a no-op apply) never needs it
    import numpy as np


@runtime_checkable
class Runner(Protocol):
    """Runs one model on batches of preprocessed images."""

    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] (RGB, 0..255) -> float32 [N, D]."""
        ...

    def describe(self) -> dict[str, Any]:
        """What actually ran (runtime, version, device), recorded in the lock next to parity results."""
        ...

    def close(self) -> None:
        """Release what the runner holds (session, net, device buffers); safe to call twice."""
        ...

    def __enter__(self) -> Any: ...

    def __exit__(self, kind: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None: ...


R = TypeVar("R", bound="Lifecycle")


class Lifecycle:
    """``with runner: ...`` closes the runner on the way out; subclasses override ``close``."""

    def close(self) -> None:
        """Nothing to release by default."""

    def __enter__(self: R) -> R:
        return self

    def __exit__(self, kind: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()


def run_batched(runner: Runner, images: np.ndarray, batch_size: int,
                progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Feed ``images`` through ``runner`` in chunks of at most ``batch_size``; concatenate the features.

    ``progress(done, total)`` is told after each chunk (images done of all), for long parity or infer runs.
    """
    import numpy as np

    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(np.asarray(runner.infer(images[i : i + batch_size]), dtype=np.float32))
        if progress is not None:
            progress(min(i + batch_size, len(images)), len(images))
    return np.concatenate(outs, axis=0) if outs else np.zeros((0, 0), np.float32)
