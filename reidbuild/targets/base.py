"""The target plugin interface: what one build target (ONNX, Caffe, a TensorRT engine, ...) tells reidbuild.

A target is one module exposing a :class:`Target`: its name (its key under ``targets:``), its pydantic
manifest model, ``contribute`` (adds its stages and runners to the plan through a :class:`Build`) and the
runner names (``backends``) parity and ``infer`` use for its artifacts, each with the precision of its default
tolerance profile. ``reidbuild.targets`` registers the built-in ones; the manifest's target, backend and
check names, the CLI's ``infer --backend`` choices, the tolerance profiles and the plan derive from that
registry. Artifacts pass between targets by *role* (``Build.provide``/``Build.artifact``) and references
come from ``Stage.outputs`` (``stages.output_ref``), never from file names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, TypeVar

from pydantic import BaseModel

from ..precision.profiles import PROFILES

if TYPE_CHECKING:
    from ..backends.base import Runner
    from ..manifest import LoadedManifest
    from ..pipeline import Stage, StageContext
    from ..sources import ModelSource
    from ..stages import ArtifactRef

# a runner factory gets a resolver from artifact file name to path (the run's output folder, a lock's, ...)
RunnerFactory = Callable[[Callable[[str], Path]], "Runner"]
PRECISIONS = tuple(PROFILES)  # fp32, fp16, int8: a runner's default tolerances are one of these profiles


@dataclass
class BackendBuild:
    """How to run one built backend: the artifacts it needs and a factory for its runner.

    ``precision`` picks the default tolerances of its parity check: fp32 uses the manifest's parity
    section (rtol/atol/min_cosine), fp16/int8 the retrieval profiles of ``reidbuild.precision.profiles``.
    """

    artifacts: list[ArtifactRef]
    factory: RunnerFactory
    available: Optional[Callable[[], Optional[str]]] = None
    output_transforms: list[str] = field(default_factory=list)
    precision: str = "fp32"


@dataclass(frozen=True)
class Artifact:
    """An artifact one target hands to others by role, with what a runner must know to feed it."""

    ref: ArtifactRef
    input_layout: str = "float32_nchw"  # what graph patches made the input (patches.input_layout)
    output_transforms: tuple[str, ...] = ()  # what graph patches declared they do to the output

    def adapter(self, color: str) -> Callable[[Any], Any]:
        """Turns the standard float32 NCHW batch (channel order ``color``) into what this graph takes."""
        layout = self.input_layout

        def adapt(batch: Any) -> Any:
            from ..patches import adapt_input

            return adapt_input(layout, batch, color)
        return adapt


@dataclass
class Build:
    """What a target's ``contribute`` works with: the manifest, the shared stages and where its own go.

    ``stages`` run in order; ``late`` stages need hardware this machine may lack (a GPU) and go after every
    parity check this machine can do, so an unavailable one (exit 3) comes last.
    """

    lm: LoadedManifest
    source: ModelSource  # where the reference PyTorch model comes from (export and parity ask it)
    load: ArtifactRef
    images: Optional[list[Path]]  # the parity images (None without a parity section)
    probe_paths: Optional[list[Path]]  # the self-check images of ONNX-writing stages
    stages: list[Stage] = field(default_factory=list)
    late: list[Stage] = field(default_factory=list)
    backends: dict[str, BackendBuild] = field(default_factory=dict)
    roles: dict[str, Artifact] = field(default_factory=dict)

    def add(self, stage: Stage, *, late: bool = False) -> Stage:
        """Append ``stage`` to the plan (or to the late stages)."""
        (self.late if late else self.stages).append(stage)
        return stage

    def provide(self, role: str, artifact: Artifact) -> None:
        """Offer an artifact to the targets registered after this one (e.g. ``onnx``: the final ONNX)."""
        self.roles[role] = artifact

    def artifact(self, role: str) -> Artifact:
        """The artifact an earlier target provided under ``role``."""
        try:
            return self.roles[role]
        except KeyError:
            raise LookupError(f"no target provides the artifact role {role!r} (provided: "
                              f"{', '.join(sorted(self.roles)) or 'none'}); register the providing target first") from None

    def runner(self, name: str, backend: BackendBuild) -> None:
        """Declare the runner parity and ``infer`` use for ``name`` (one of the target's ``backends``)."""
        self.backends[name] = backend

    def prove(self, name: str) -> None:
        """Add the parity stage of runner ``name`` now (checks that must pass before later stages build on it)."""
        if self.images is None:
            return
        from ..stages.parity import ParityCheck, parity_stage

        b = self.backends[name]
        factory = b.factory

        def make_runner(ctx: StageContext) -> Runner:
            return factory(ctx.artifact)

        check = ParityCheck(name, b.artifacts, make_runner, self.profile(b.precision),
                            available=b.available, output_transforms=b.output_transforms)
        self.stages.append(parity_stage(self.lm, self.source, self.load, check, self.images))

    def profile(self, precision: str) -> dict[str, Any]:
        """Default tolerances for a check of ``precision``: fp32 from the manifest's parity section."""
        if precision == "fp32":
            from ..stages.parity import fp32_profile

            return fp32_profile(self.lm)
        from ..precision.profiles import default_tolerance

        return default_tolerance(precision)


@dataclass(frozen=True)
class Target:
    """One build target, as registered in ``reidbuild.targets``.

    ``name``: its key under ``targets:``; ``model``: the pydantic model of that section; ``contribute(build,
    section)``: adds its stages and runners (called only when the manifest declares the section, or always
    with ``always``, in registration order); ``backends``: every runner name it may declare, with the
    precision of that check's default tolerances (these names are ``parity.overrides`` keys, ``infer
    --backend`` choices and tolerance-profile names); ``requestable``: those a manifest may list under
    ``parity.backends`` (the others are proven automatically); ``validate(manifest)``: cross-section rules,
    raising ValueError with a one-line message.
    """

    name: str
    model: type[BaseModel]
    contribute: Callable[[Build, Any], None]
    backends: Mapping[str, str]
    requestable: tuple[str, ...] = ()
    always: bool = False
    validate: Optional[Callable[[Any], None]] = None
    description: str = ""

    def __post_init__(self) -> None:
        bad = [p for p in self.backends.values() if p not in PRECISIONS]
        if bad or not set(self.requestable) <= set(self.backends):
            raise ValueError(f"target {self.name}: backends need a precision in {PRECISIONS} and requestable "
                             "backends must be among its backends")


M = TypeVar("M", bound=BaseModel)


def section(manifest: Any, name: str, model: type[M]) -> Optional[M]:
    """The manifest's ``targets.<name>`` section as ``model`` (None when the manifest does not declare it)."""
    value = getattr(manifest.targets, name, None)
    if value is None:
        return None
    if not isinstance(value, model):
        raise TypeError(f"targets.{name} is a {type(value).__name__}, not a {model.__name__}")
    return value


def patch_files(lm: LoadedManifest, rels: list[str], key: str) -> list[Path]:
    """``targets.<key>.patches`` resolved against the manifest's folder; a missing file is a ManifestError."""
    from ..errors import ManifestError

    paths = []
    for i, rel in enumerate(rels):
        p = lm.resolve(rel)
        if not p.is_file():
            raise ManifestError(f"{lm.where('targets', key, 'patches', i)}: targets.{key}.patches[{i}]: "
                                f"patch file {rel!r} not found")
        paths.append(p)
    return paths
