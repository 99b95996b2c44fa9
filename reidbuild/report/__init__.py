"""The HTML parity report: what each backend computes next to PyTorch, as one self-contained file.

``collect`` gathers the facts (lock records, parity feature files, images), ``render`` turns them into HTML
with matplotlib charts embedded as data URIs. Both run from a finished build without any model, so
``reidbuild report`` rebuilds nothing. Imported lazily: the no-op apply never loads matplotlib.
"""
from __future__ import annotations

from .collect import ReportData, collect
from .render import render

__all__ = ["ReportData", "collect", "render"]
