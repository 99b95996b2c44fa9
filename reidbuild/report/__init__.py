"""The HTML parity report: what each backend computes next to PyTorch, as one self-contained file.

``collect`` gathers the facts (lock records, parity feature files, images), ``render`` turns them into HTML
with hand-drawn SVG charts inlined. Both run from a finished build without any model, so ``reidbuild report``
rebuilds nothing. Imported lazily, only when a report is written (a no-op apply never loads it).
"""
from __future__ import annotations

from .collect import ReportData, collect
from .render import render

__all__ = ["ReportData", "collect", "render"]
