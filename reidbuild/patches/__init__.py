"""Graph patches: a declarative, checked language for editing ONNX and Caffe graphs.

A patch file (YAML) names its format and a list of ops; ``targets.<onnx|caffe>.patches`` in the manifest
lists patch files, which run in order as the ``onnx.patch`` / ``caffe.patch`` stage. See
``graph_patches/README.md`` for the language and the ready-made patches.

Public API:

* :func:`load_patch` / :func:`load_patches` - validate patch files (PatchError with file:line:col);
* :func:`apply_onnx` / :func:`apply_caffe` - apply and check (what the stage runs);
* :func:`diff_patches` (and the per-format variants) - per patch, a unified diff of the graph text;
* :func:`output_transforms`, :func:`apply_output_transform` - what patches do to the features (parity);
* :func:`input_layout` - what patches do to the graph input (parity / infer); :func:`adapt_input` feeds it
  (re-exported from :mod:`reidbuild.backends.inputs`, the one input adapter).
"""
from __future__ import annotations

from ..backends.inputs import adapt_input
from .apply import (apply_caffe, apply_onnx, apply_output_transform, diff_caffe_patches,
                    diff_onnx_patches, diff_patches, input_layout, output_transforms)
from .spec import (DEFAULT_INPUT_LAYOUT, INPUT_LAYOUTS, OP_NAMES, OUTPUT_TRANSFORMS, LoadedPatch, PatchFile,
                   load_patch, load_patches)

__all__ = [
    "DEFAULT_INPUT_LAYOUT", "INPUT_LAYOUTS", "OP_NAMES", "OUTPUT_TRANSFORMS", "LoadedPatch", "PatchFile",
    "adapt_input", "apply_caffe", "apply_onnx", "apply_output_transform", "diff_caffe_patches",
    "diff_onnx_patches", "diff_patches", "input_layout", "load_patch", "load_patches", "output_transforms",
]
