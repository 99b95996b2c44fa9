"""One exception hierarchy; the CLI alone turns these into messages and exit codes."""
from __future__ import annotations


class ReidbuildError(Exception):
    """Base of every error reidbuild reports to a user (never shown as a traceback)."""

    exit_code = 5

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CheckFailed(ReidbuildError):
    """Parity failed, verify found a mismatch, or --locked found drift."""

    exit_code = 1


class InputError(ReidbuildError):
    """Invalid manifest, patch file, config, checkpoint or image."""

    exit_code = 2


class ManifestError(InputError):
    """The manifest (or a file it names) does not validate."""


class PatchError(InputError):
    """A patch file is invalid or an op matched nothing."""


class CheckpointError(InputError):
    """A checkpoint cannot be loaded safely or does not fit the model."""


class ConfigError(InputError):
    """A fast-reid config is invalid or unsupported."""


class ImageError(InputError):
    """An image cannot be read or an image glob matched nothing."""


class Unavailable(ReidbuildError):
    """A backend or tool the manifest needs is not installed on this machine (e.g. TensorRT, a GPU, Caffe)."""

    exit_code = 3


class Busy(ReidbuildError):
    """Another reidbuild run holds the output folder."""

    exit_code = 4


class StageFailed(ReidbuildError):
    """A stage's tool failed (export, simplify, conversion, a patch that broke the graph)."""

    exit_code = 5


class NotExpressible(StageFailed):
    """A graph construct has no faithful equivalent in the target format/dialect."""


EXIT_IO, EXIT_INTERNAL, EXIT_INTERRUPTED = 6, 70, 130


def classify(exc: BaseException) -> tuple[int, str]:
    """The exit code and one-line message for an error (shared by the CLI and fleet builds' per-manifest
    results, so one manifest's failure reads the same alone or in a fleet)."""
    if isinstance(exc, ReidbuildError):
        return exc.exit_code, exc.message
    if isinstance(exc, OSError) and exc.strerror:
        return EXIT_IO, f"{exc.filename or 'file system'}: {exc.strerror} (nothing half-written was kept)"
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return EXIT_INTERNAL, (f"internal error: {type(exc).__name__}: {first} (a bug in reidbuild; set "
                           "REIDBUILD_DEBUG=1 for a traceback)")
