"""Patch files: pydantic models of the YAML a user writes, and loading with file:line:column errors.

A patch file names its format (``onnx`` or ``caffe``), what it changes about the model's inputs or
outputs (so parity can apply the same to the PyTorch reference), and a list of ops applied in order.
"""
from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import yamlio
from ..errors import PatchError
from ..manifest import format_validation_error

OUTPUT_TRANSFORMS = ("l2_normalize",)
INPUT_LAYOUTS = ("uint8_bgr_nhwc",)
DEFAULT_INPUT_LAYOUT = "float32_nchw"  # what backends feed when no patch changes the input



def _check_value(v: Any, depth: int = 0) -> Any:
    """A field/attribute value: scalars, lists and (Caffe messages) mappings; no nulls."""
    if v is None:
        raise ValueError("value is null; to delete a field use remove_field")
    if depth > 10:
        raise ValueError("value is nested too deeply")
    if isinstance(v, list):
        for x in v:
            _check_value(x, depth + 1)
    elif isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"mapping keys must be field names, got {k!r}")
            _check_value(x, depth + 1)
    elif not isinstance(v, (bool, int, float, str)):
        raise ValueError(f"unsupported value {v!r}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _simple_name(v: str, what: str) -> str:
    if not v or len(v) > 200 or any(c in v for c in "\x00\n\r\"'\\"):
        raise ValueError(f"{what} must be 1..200 characters without quotes, backslashes or line breaks")
    return v


class Selector(_Strict):
    """Picks nodes (ONNX) or layers (Caffe); every given key must hold (AND)."""

    name: Optional[str] = Field(default=None, description="Exact node/layer name.")
    type: Optional[str] = Field(default=None, description="ONNX op_type or Caffe layer type, e.g. Conv, Pooling.")
    regex: Optional[str] = Field(default=None, description="Python regex that must match the whole name.")
    producer_of: Optional[str] = Field(default=None, description="The node/layer writing this tensor/blob.")
    consumer_of: Optional[str] = Field(default=None, description="Nodes/layers reading this tensor/blob.")
    last: Optional[Literal[True]] = Field(default=None, description="The node/layer producing a graph output.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if len(v) > 500:
            raise ValueError("regex is longer than 500 characters")
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regex: {exc}") from None
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> "Selector":
        if not self.model_dump(exclude_none=True):
            raise ValueError("select needs at least one of: name, type, regex, producer_of, consumer_of, last")
        return self

    def describe(self) -> str:
        """The selector as the user wrote it, e.g. ``{type: Pooling, last: true}``."""
        parts = []
        for k, v in self.model_dump(exclude_none=True).items():
            parts.append(f"{k}: {str(v).lower() if isinstance(v, bool) else v}")
        return "{" + ", ".join(parts) + "}"


class _Op(_Strict):
    optional: bool = Field(False, description="Matching nothing is fine (otherwise it is an error).")


class RenameTensor(_Op):
    """Rename a tensor/blob; every reference follows. Name it (``tensor``) or select its producer."""

    op: Literal["rename_tensor"]
    select: Optional[Selector] = None
    tensor: Optional[str] = Field(None, description="The tensor/blob name to rename (all its uses).")
    output: int = Field(0, ge=0, description="With select: which output/top of the node.")
    to: str

    @model_validator(mode="after")
    def _one_of(self) -> "RenameTensor":
        if (self.select is None) == (self.tensor is None):
            raise ValueError("rename_tensor needs exactly one of select (the producing node) or tensor (a name)")
        _simple_name(self.to, "to")
        return self


class RenameNode(_Op):
    op: Literal["rename_node"]
    select: Selector
    to: str

    @field_validator("to")
    @classmethod
    def _name(cls, v: str) -> str:
        return _simple_name(v, "to")


class RemoveNode(_Op):
    """Remove nodes/layers with a single data input; their consumers read that input instead."""

    op: Literal["remove_node"]
    select: Selector


class RemoveField(_Op):
    op: Literal["remove_field"]
    select: Selector
    field: str = Field(description="Caffe: a layer parameter path (pooling_param.ceil_mode); ONNX: an attribute.")


class SetField(_Op):
    op: Literal["set_field"]
    select: Selector
    field: str
    value: Any = Field(description="Number, string, boolean, list, or (Caffe message field) a mapping.")

    @model_validator(mode="before")
    @classmethod
    def _value_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and "value" not in data:
            raise ValueError("set_field needs a value (to delete a field use remove_field)")
        return data

    @field_validator("value")
    @classmethod
    def _value(cls, v: Any) -> Any:
        return _check_value(v)


class NewNode(_Strict):
    """The node/layer an insert op adds."""

    type: str = Field(description="ONNX op_type or Caffe layer type.")
    name: str
    output: Optional[str] = Field(None, description="Name of the new tensor/blob (default: the node name).")
    attributes: dict[str, Any] = Field(default_factory=dict, description="ONNX attributes.")
    domain: str = Field("", description="ONNX operator domain (default: the standard one).")
    params: dict[str, Any] = Field(default_factory=dict, description="Caffe layer parameters, e.g. pooling_param.")

    @field_validator("name", "output")
    @classmethod
    def _names(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else _simple_name(v, "name")

    @field_validator("attributes", "params")
    @classmethod
    def _values(cls, v: dict[str, Any]) -> dict[str, Any]:
        checked: dict[str, Any] = _check_value(v)
        return checked


class InsertNode(_Op):
    """insert_after: the new node reads the selected node's output and its consumers read the new node.
    insert_before: the new node sits between the selected node and one of its inputs."""

    op: Literal["insert_after", "insert_before"]
    select: Selector
    node: NewNode
    output: int = Field(0, ge=0, description="insert_after: which output/top of the selected node.")
    input: int = Field(0, ge=0, description="insert_before: which input/bottom of the selected node.")


class SetBatch(_Op):
    op: Literal["set_batch"]
    size: Union[int, str] = Field(description="A batch size (1..65536) or 'dynamic'.")
    dim_param: str = Field("batch", description="Name of the symbolic batch dimension (size: dynamic).")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if v == "dynamic" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536):
            return v
        raise ValueError(f"size must be a batch size from 1 to 65536 or 'dynamic', got {v!r}")


class L2NormalizeOutput(_Op):
    op: Literal["l2_normalize_output"]
    eps: float = Field(1e-12, gt=0, le=1e-3, description="x / max(||x||_2, eps), like torch F.normalize.")


class Uint8BgrInput(_Op):
    op: Literal["uint8_bgr_input"]
    model_color: Literal["RGB", "BGR"] = Field(
        "RGB", description="Channel order the model was trained on (the manifest's input.color).")


class StripMetadata(_Op):
    op: Literal["strip_metadata"]
    producer: bool = Field(False, description="Also clear producer_name / producer_version.")


class ConvertPoolingRounding(_Op):
    """Make Pooling layers compute the same in another dialect's rounding (Caffe only)."""

    op: Literal["convert_pooling_rounding"]
    to: Literal["bvlc", "ceil_mode"]
    select: Optional[Selector] = Field(None, description="Default: every Pooling layer.")
    on_shape_change: Literal["refuse", "slice"] = Field(
        "refuse", description="When ceil rounding would add a row/column: refuse, or slice it off exactly.")


Op = Annotated[Union[RenameTensor, RenameNode, RemoveNode, RemoveField, SetField, InsertNode, SetBatch,
                     L2NormalizeOutput, Uint8BgrInput, StripMetadata, ConvertPoolingRounding],
               Field(discriminator="op")]

OP_NAMES = ("rename_tensor", "rename_node", "remove_node", "remove_field", "set_field", "insert_after",
            "insert_before", "set_batch", "l2_normalize_output", "uint8_bgr_input", "strip_metadata",
            "convert_pooling_rounding")
ONNX_ONLY = ("set_batch", "l2_normalize_output", "uint8_bgr_input", "strip_metadata")
CAFFE_ONLY = ("convert_pooling_rounding",)


class PatchFile(_Strict):
    format: Literal["onnx", "caffe"]
    description: str = ""
    changes_output: Optional[Literal["l2_normalize"]] = Field(
        None, description="What the patch does to the features; parity applies the same to the reference.")
    changes_input: Optional[Literal["uint8_bgr_nhwc"]] = Field(
        None, description="The graph's new input layout; parity/infer adapt the images they feed.")
    ops: list[Op] = Field(min_length=1, max_length=1000)


@dataclass(frozen=True)
class LoadedPatch:
    """A validated patch file plus where it lives (for error messages) and its content hash."""

    path: Path
    model: PatchFile
    doc: yamlio.Document
    sha256: str

    @property
    def format(self) -> str:
        return self.model.format

    def where(self, *key_path: Any) -> str:
        return self.doc.where(key_path)

    def op_label(self, index: int) -> str:
        """``file:line:col: ops[i] (name)``: how errors point at one op."""
        return f"{self.where('ops', index)}: ops[{index}] ({self.model.ops[index].op})"


def _did_you_mean(word: str, options: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(options)})"


def _precheck_ops(doc: yamlio.Document) -> None:
    """Friendlier messages than pydantic's for the commonest slip: a misspelt or missing op name."""
    ops = doc.data.get("ops") if isinstance(doc.data, dict) else None
    if not isinstance(ops, list):
        return
    for i, op in enumerate(ops):
        if not isinstance(op, dict):
            continue
        name = op.get("op")
        if name is None:
            raise PatchError(f"{doc.where(('ops', i))}: ops.{i}: every op needs an 'op' key "
                             f"(one of: {', '.join(OP_NAMES)})")
        if name not in OP_NAMES:
            raise PatchError(f"{doc.where(('ops', i, 'op'))}: ops.{i}.op: unknown op {name!r}"
                             f"{_did_you_mean(str(name), OP_NAMES)}")


def _semantic_checks(doc: yamlio.Document, pf: PatchFile) -> None:
    """Cross-field rules pydantic cannot place on a line: per-format ops and declared side effects."""
    fmt = pf.format
    kinds = [op.op for op in pf.ops]
    for i, op in enumerate(pf.ops):
        at = doc.where(("ops", i, "op"))
        if fmt == "caffe" and op.op in ONNX_ONLY:
            raise PatchError(f"{at}: ops.{i}.op: {op.op} is for ONNX graphs only; this patch has format: caffe")
        if fmt == "onnx" and op.op in CAFFE_ONLY:
            raise PatchError(f"{at}: ops.{i}.op: {op.op} is for Caffe graphs only; this patch has format: onnx")
        if isinstance(op, InsertNode):
            bad = "params" if fmt == "onnx" and op.node.params else (
                "attributes" if fmt == "caffe" and (op.node.attributes or op.node.domain) else None)
            if bad:
                use = "attributes" if fmt == "onnx" else "params"
                raise PatchError(f"{doc.where(('ops', i, 'node', bad))}: ops.{i}.node.{bad}: a {fmt} node takes "
                                 f"{use}, not {bad}")
        if isinstance(op, (SetBatch, L2NormalizeOutput, Uint8BgrInput, StripMetadata)) and op.optional:
            raise PatchError(f"{doc.where(('ops', i, 'optional'))}: ops.{i}.optional: {op.op} always applies; "
                             "optional has no meaning here")
    if "l2_normalize_output" in kinds and pf.changes_output != "l2_normalize":
        i = kinds.index("l2_normalize_output")
        raise PatchError(f"{doc.where(('ops', i, 'op'))}: ops.{i}: l2_normalize_output changes the features; "
                         "declare 'changes_output: l2_normalize' at the top of the patch so parity normalises "
                         "the reference too")
    if "uint8_bgr_input" in kinds and pf.changes_input != "uint8_bgr_nhwc":
        i = kinds.index("uint8_bgr_input")
        raise PatchError(f"{doc.where(('ops', i, 'op'))}: ops.{i}: uint8_bgr_input changes the graph input; "
                         "declare 'changes_input: uint8_bgr_nhwc' at the top of the patch so parity feeds "
                         "uint8 BGR NHWC images")
    if kinds.count("uint8_bgr_input") > 1:
        raise PatchError(f"{doc.where(('ops',))}: ops: uint8_bgr_input is given more than once")
    if fmt == "caffe" and pf.changes_input is not None:
        raise PatchError(f"{doc.where(('changes_input',))}: changes_input: Caffe graphs keep their float NCHW "
                         "input; only ONNX patches can change it")


def load_patch(path: Path) -> LoadedPatch:
    """Read and validate one patch file; every failure is a PatchError naming ``file:line:column``."""
    path = Path(path).absolute()
    doc = yamlio.load_mapping(path, "patch file", PatchError,
                              "format, ops (and optionally description, changes_output, changes_input)")
    _precheck_ops(doc)
    try:
        model = PatchFile.model_validate(doc.data)
    except ValidationError as exc:
        raise PatchError(format_validation_error(doc, exc, PatchFile)) from None
    _semantic_checks(doc, model)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoadedPatch(path=path, model=model, doc=doc, sha256=digest)


def load_patches(paths: list[Path], fmt: Optional[str] = None) -> list[LoadedPatch]:
    """Load every patch; with ``fmt``, refuse a patch written for the other format."""
    out = []
    for p in paths:
        lp = load_patch(p)
        if fmt is not None and lp.format != fmt:
            raise PatchError(f"{lp.where('format')}: format: this patch is for {lp.format} graphs but is listed "
                             f"under targets.{fmt}.patches")
        out.append(lp)
    return out
