"""The manifest: pydantic models of the YAML a user writes, and loading with file:line:column errors.

Only data lives here; what the manifest *means* (which stages run) is decided by the targets and
``stages.assemble``. The ``targets`` section and the names ``parity`` accepts come from the target registry
(``reidbuild.targets``): ``load_manifest`` validates with :func:`manifest_model`.
"""
from __future__ import annotations

import difflib
import glob as _glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, Discriminator, Field, Tag, ValidationError, create_model, field_validator, model_validator

from . import targets as target_registry
from . import yamlio
from .errors import ImageError, ManifestError
from .manifest_parts import Calibration, Strict
from .targets.caffe import CaffeTarget
from .targets.onnx import OnnxTarget
from .targets.onnx_int8_cpu import OnnxInt8CpuTarget
from .targets.tensorrt import TensorRTTarget

# the built-in targets' sections, importable from here as before (they live in reidbuild.targets.*)
__all__ = ["Calibration", "CaffeTarget", "Input", "LoadedManifest", "Manifest", "OnnxInt8CpuTarget", "OnnxTarget",
           "Parity", "RandomSource", "SourceSpec", "Targets", "TensorRTTarget", "Tolerance", "check_file_name", "json_schema",
           "load_manifest", "manifest_model"]


def check_file_name(value: str, what: str = "name") -> str:
    """Refuse anything that could escape a folder when used as (part of) a file name."""
    if not value or "/" in value or "\\" in value or ".." in value or value.startswith(".") or "\x00" in value:
        raise ValueError(f"{what} must be a plain file name (no '/', '\\', '..' or leading '.'), got {value!r}")
    if len(value) > 100:
        raise ValueError(f"{what} must be at most 100 characters")
    return value


class RandomWeights(Strict):
    seed: int = Field(ge=0, description="Seed for deterministic random weights (demo and tests).")


class RandomSource(Strict):
    random: RandomWeights


class SourceSpec(Strict):
    """The manifest's ``source`` section: each model source (``reidbuild.sources``) subclasses it with its own
    fields and ``format`` as a one-value Literal; ``manifest_model()`` accepts the registered ones."""

    format: str


class Input(Strict):
    height: int = Field(ge=8, le=4096)
    width: int = Field(ge=8, le=4096)
    color: Literal["RGB", "BGR"] = Field("RGB", description="Channel order fed to the model.")
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"] = "bicubic"


class Targets(Strict):
    """The ``targets`` section: one optional field per registered target (``reidbuild.targets``); the model
    ``load_manifest`` validates with is derived from the registry (:func:`manifest_model`)."""


class Tolerance(Strict):
    """Per-check tolerances; unset fields fall back to the parity section or the precision profile."""

    rtol: Optional[float] = Field(None, ge=0)
    atol: Optional[float] = Field(None, ge=0)
    min_cosine: Optional[float] = Field(None, ge=-1, le=1)
    min_rank1: Optional[float] = Field(None, ge=0, le=1, description="Rank-1 agreement with the reference.")
    topk: Optional[int] = Field(None, ge=1)
    min_topk_overlap: Optional[float] = Field(None, ge=0, le=1)
    compare: Optional[Literal["normalized", "raw"]] = Field(None, description="What rtol/atol apply to.")


class Parity(Strict):
    images: str
    reference: Literal["torch"] = "torch"
    compare: Literal["normalized", "raw"] = Field(
        "normalized", description="rtol/atol apply to the L2-normalised features (what re-id matching uses) "
        "or to the raw features.")
    rtol: float = Field(1e-3, ge=0)
    atol: float = Field(1e-5, ge=0)
    min_cosine: Optional[float] = Field(None, ge=-1, le=1, description="Default 0.9999 for fp32 checks.")
    # the names come from the target registry (manifest_model narrows both to them)
    backends: list[str] = Field(min_length=1)
    overrides: dict[str, Tolerance] = Field(default_factory=dict, description="Per-backend tolerance overrides.")
    batch_size: int = Field(4, ge=1, le=256)

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("backends are listed more than once")
        return v


class Manifest(Strict):
    version: Literal[1]
    name: str
    source: SourceSpec  # one of the registered sources' specs: see manifest_model()
    input: Input
    output_dir: str
    targets: Targets = Field(default_factory=Targets)
    parity: Optional[Parity] = None

    @field_validator("name")
    @classmethod
    def _file_name(cls, v: str) -> str:
        return check_file_name(v)

    @model_validator(mode="after")
    def _cross_field(self) -> "Manifest":
        for target in target_registry.registered():
            if target.validate is not None:
                target.validate(self)
        if self.parity is not None:
            owners = {b: t.name for t in target_registry.registered() for b in t.requestable}
            missing = [b for b in self.parity.backends if getattr(self.targets, owners.get(b, ""), None) is None]
            if missing:
                raise ValueError(f"parity.backends {missing} are not declared under targets")
        return self


_MODELS: dict[tuple[int, tuple[type[SourceSpec], ...]], type[Manifest]] = {}


def manifest_model() -> type[Manifest]:
    """The Manifest model for the targets and model sources registered now: ``targets`` has one field per
    target, ``parity.backends``/``parity.overrides`` accept their runner names, and ``source`` is the section of
    the source its ``format`` names (rebuilt when a registry changes)."""
    from . import sources  # sources' sections build on this module: imported on first use, not at import

    key = (target_registry.generation(), sources.spec_types())
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = _derive(key[1])
    return _MODELS[key]


def _derive(specs: tuple[type[SourceSpec], ...]) -> type[Manifest]:
    """Subclasses of Targets, Parity and Manifest whose fields the registries fill: typo'd target keys, check
    names, backends and source keys fail with file:line:column and the registered names, like hand-written
    fields did."""
    fields: dict[str, Any] = {}
    for t in target_registry.registered():
        make: Callable[[], Any] = t.model
        fields[t.name] = (t.model, Field(default_factory=make)) if t.always else (Optional[t.model], None)
    targets = create_model("Targets", __base__=Targets, **fields)
    requestable: Any = Literal.__getitem__(target_registry.requestable_backends())
    checks: Any = Literal.__getitem__(target_registry.backend_names())
    optional_parity: Any = Optional[parity_model(requestable, checks)]
    return create_model("Manifest", __base__=Manifest, __doc__=Manifest.__doc__, source=(_source_field(specs), ...),
                        targets=(targets, Field(default_factory=targets)), parity=(optional_parity, None))


def _source_field(specs: tuple[type[SourceSpec], ...]) -> Any:
    """One source: its own model, so its errors read exactly as they always did (no union tag in the way);
    several: a union tagged by ``format`` (a callable tag: a discriminator field may not have the before-validator
    every Strict field has)."""
    if len(specs) == 1:
        return specs[0]
    tagged = tuple(Annotated[s, Tag(str(get_args(s.model_fields["format"].annotation)[0]))] for s in specs)
    return Annotated[Union[tagged], Discriminator(_format_of)]


def _format_of(value: Any) -> Any:
    """The ``format`` of a source section, as data or as a validated model."""
    return value.get("format") if isinstance(value, dict) else getattr(value, "format", None)


def parity_model(requestable: Any, checks: Any) -> type[Parity]:
    """``Parity`` with ``backends`` and ``overrides`` narrowed to the registered names (their errors list them)."""
    return create_model("Parity", __base__=Parity, __doc__=Parity.__doc__,
                        backends=(list[requestable], Parity.model_fields["backends"]),
                        overrides=(dict[checks, Tolerance], Parity.model_fields["overrides"]))


@dataclass(frozen=True)
class LoadedManifest:
    """A validated manifest plus where it lives; all paths resolve relative to the manifest's folder."""

    path: Path
    model: Manifest
    doc: yamlio.Document
    sha256: str

    @property
    def base(self) -> Path:
        return self.path.parent

    @property
    def output_dir(self) -> Path:
        return (self.base / self.model.output_dir).resolve()

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".lock")

    def resolve(self, rel: str) -> Path:
        return (self.base / rel).resolve()

    def where(self, *key_path: Any) -> str:
        return self.doc.where(key_path)

    def images(self, *key_path: str) -> list[Path]:
        """Files matched by the glob at ``key_path`` (e.g. 'parity', 'images'), sorted; none is an error."""
        node: Any = self.model
        for k in key_path:
            node = getattr(node, k)
        pattern = str(self.base / node)
        found = sorted(Path(p).resolve() for p in _glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not found:
            raise ImageError(f"{self.where(*key_path)}: {'.'.join(key_path)}: glob {node!r} matches no file")
        return found


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(sorted(options))})"


def _model_at(loc: tuple[Any, ...], data: Any) -> type[BaseModel] | None:
    """The pydantic model owning the mapping at ``loc`` of ``data`` (for 'did you mean' suggestions)."""
    model: Any = manifest_model()
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        fld = model.model_fields.get(part) if isinstance(part, str) else None
        if fld is None:
            return None
        data = data.get(part) if isinstance(data, dict) else None
        model = _unwrap(fld.annotation, data)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(tp: Any, data: Any) -> Any:
    """The model in a union that ``data`` is meant for: the one whose Literal fields (a source's ``format``)
    match it, else the first."""
    args = [get_args(a)[0] if get_origin(a) is Annotated else a for a in get_args(tp)]  # tagged members
    members = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    for member in members:
        tags = {k: get_args(f.annotation) for k, f in member.model_fields.items() if get_origin(f.annotation) is Literal}
        if isinstance(data, dict) and all(data.get(k) in values for k, values in tags.items() if k in data):
            return member
    return members[0] if members else tp


def format_validation_error(doc: yamlio.Document, exc: ValidationError, root: Optional[type[BaseModel]] = None) -> str:
    """One line for the first error: ``file:line:col: field.path: what was expected`` (+ count of others).

    ``root``: the model validated (None: the manifest, whose unknown keys get 'did you mean' suggestions)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    data_loc = _data_loc(doc, first)
    # a union ({random: {seed: N}} or a path) fails once per member: report the member that matched the data
    # deepest (the bad seed), not the first member tried ("should be a valid string")
    for other in errors[1:]:
        deeper = _data_loc(doc, other)
        if len(deeper) > len(data_loc) and deeper[: len(data_loc)] == data_loc and first["type"] != "missing":
            first, data_loc = other, deeper
    field = ".".join(_show_key(p) for p in data_loc) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        owner = _model_at(tuple(data_loc[:-1]), doc.data) if root is None else None
        if owner is not None:
            msg = f"unknown key{_did_you_mean(str(data_loc[-1]), list(owner.model_fields))}"
        else:
            msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif first["type"] == "literal_error":
        msg = f"got {first.get('input')!r}; {msg.lower()}"
    elif first["type"] in ("union_tag_invalid", "union_tag_not_found"):  # source.format, several sources known
        ctx = first.get("ctx", {})
        data_loc = [*data_loc, "format"]  # the one tagged union: source sections, tagged by format
        field = ".".join(_show_key(p) for p in data_loc)
        msg = (f"got {ctx.get('tag')!r}; expected one of: {ctx.get('expected_tags')}"
               if first["type"] == "union_tag_invalid" else "required key is missing")
    msg = msg.replace("Value error, ", "")
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    where = doc.where(tuple(data_loc[:-1]) if first["type"] == "missing" else tuple(data_loc))
    return f"{where}: {field}: {msg}{more}"


def _show_key(key: Any) -> str:
    """A key as written, or quoted when it is empty or holds line breaks/control characters (one-line errors)."""
    if isinstance(key, str) and (not key or not key.isprintable()):
        return repr(key)
    return str(key)


def _data_loc(doc: yamlio.Document, error: Any) -> list[Any]:
    """The error's location as keys of the user's data (pydantic adds union member names like 'str')."""
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-"))))
    data_loc: list[Any] = []
    node: Any = doc.data
    for part in loc:
        if isinstance(node, dict) and part in node:
            data_loc.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            data_loc.append(part)
            node = node[part]
        elif error["type"] == "missing" and part == loc[-1]:
            data_loc.append(part)
    return data_loc


def load_manifest(path: Path) -> LoadedManifest:
    """Read and validate a manifest; every failure is a ManifestError with file:line:column."""
    import hashlib

    path = Path(path).absolute()
    doc = yamlio.load_mapping(path, "manifest", ManifestError, "version, name, source, input, output_dir, ...")
    try:
        model = manifest_model().model_validate(doc.data)
    except ValidationError as exc:
        raise ManifestError(format_validation_error(doc, exc)) from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    lm = LoadedManifest(path=path, model=model, doc=doc, sha256=digest)
    if lm.lock_path == path:
        raise ManifestError(f"{path}: a manifest may not end in .lock: its lock file ({lm.lock_path.name}) "
                            "would overwrite it; rename it to .yml")
    return lm


def json_schema() -> str:
    """The manifest's JSON Schema, for editors."""
    schema = manifest_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "reidbuild manifest"
    return json.dumps(schema, indent=2, sort_keys=True)
