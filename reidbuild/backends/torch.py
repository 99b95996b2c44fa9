"""PyTorch runner: the reference every other backend is compared with."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import Lifecycle


class TorchRunner(Lifecycle):
    """The model itself is the caller's (a run shares one across stages): closing drops only this reference."""

    name = "torch"

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from ..heap import reusing_heap

        # a copy: fast-reid's own Baseline normalises its input in place (images.sub_(mean).div_(std)), which
        # would change the caller's batch before other backends see it. Activations reuse heap memory
        # (``reidbuild.heap``: fresh mappings per layer made an R50 pass twice as slow)
        with torch.inference_mode(), reusing_heap():
            out = self.model(torch.from_numpy(np.array(batch, dtype=np.float32, copy=True)))
        features: np.ndarray = out.detach().cpu().numpy().astype(np.float32)
        return features

    def describe(self) -> dict[str, Any]:
        import torch

        return {"runtime": "torch", "version": torch.__version__, "device": "cpu"}

    def close(self) -> None:
        self.model = None
