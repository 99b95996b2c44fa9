"""Feature files: the parity stage's per-image features as a byte-reproducible ``.npz``.

``numpy.savez`` stamps each zip member with the current time, so the same features would hash differently
run to run; here every member gets a fixed timestamp, so a rebuild from the same inputs gives the same bytes
(``verify --rebuild`` relies on that). Read back with ``allow_pickle=False``: the file is untrusted input.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # imported where used: planning a build (a no-op apply) must not pay for numpy
    import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold


def dumps(arrays: dict[str, np.ndarray]) -> bytes:
    """The ``.npz`` bytes of ``arrays`` (members in sorted order, fixed timestamps, no pickles)."""
    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def load(path: Path) -> dict[str, np.ndarray]:
    """Every array in the ``.npz`` at ``path``; a damaged file is an InputError naming it."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: cannot read feature file ({exc})") from None
