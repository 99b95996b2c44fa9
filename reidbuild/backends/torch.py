"""PyTorch runner: the reference every other backend is compared with."""
from __future__ import annotations

from typing import Any

import numpy as np


class TorchRunner:
    name = "torch"

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():  # a copy: fast-reid's own models normalise their input in place
            out = self.model(torch.tensor(np.asarray(batch, dtype=np.float32)))
        return out.detach().cpu().numpy().astype(np.float32)

    def describe(self) -> dict[str, Any]:
        import torch

        return {"runtime": "torch", "version": torch.__version__, "device": "cpu"}
