"""infer: run one backend's built artifacts on images and save one feature file per image (.npy)."""
from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import lockfile
from .backends.base import Runner, run_batched
from .errors import CheckFailed, ImageError, InputError, Unavailable
from .fsutil import HashCache, atomic_write, ensure_dir
from .manifest import LoadedManifest


def make_runner(lm: LoadedManifest, backend: str) -> Runner:
    """A runner for ``backend`` over the committed artifacts, each checked against the lock first; the caller
    closes it (``with make_runner(...) as runner``)."""
    from .stages.assemble import assemble

    if backend == "torch":
        from .backends.torch import TorchRunner
        from .sources import open_source

        return TorchRunner(open_source(lm).build_model())
    build = assemble(lm).backends.get(backend)
    if build is None:
        raise InputError(f"{lm.path}: backend {backend} is not built by this manifest (not a declared target)")
    lock = lockfile.read(lm.lock_path)
    if lock is None:
        raise CheckFailed(f"{lm.lock_path}: no lock; run `reidbuild apply {lm.path.name}` first")
    hashes = HashCache()
    for art in build.artifacts:
        rec = lock.stages.get(art.stage)
        entry = rec.outputs.get(art.file) if rec is not None and rec.status == "ok" else None
        path = lm.output_dir / art.file
        if entry is None:
            raise CheckFailed(f"{art.file}: not built (stage {art.stage} has not run); run `reidbuild apply`")
        if not path.is_file() or hashes.file(path) != entry["sha256"]:
            raise CheckFailed(f"{path}: artifact is missing or differs from the lock; run `reidbuild apply`")
    why = build.available() if build.available else None
    if why:
        raise Unavailable(why)
    return build.factory(lambda f: lm.output_dir / f)


def run_infer(lm: LoadedManifest, backend: str, pattern: str, out_dir: Path, batch_size: int,
              progress: Optional[Callable[[int, int], None]] = None) -> list[Path]:
    """Features of every image matching ``pattern``; ``progress(done, total)`` after each batch."""
    from .images import load_images

    paths = sorted(Path(p).resolve() for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise ImageError(f"--input {pattern!r} matches no file")
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise InputError(f"--input: {p} and {stems[p.stem]} would both write {p.stem}.npy")
        stems[p.stem] = p
    inp = lm.model.input
    written: list[Path] = []
    with make_runner(lm, backend) as runner:  # closed on the way out, whatever happens
        ensure_dir(out_dir)
        for i in range(0, len(paths), batch_size):
            chunk = paths[i: i + batch_size]
            feats = run_batched(runner, load_images(chunk, inp.height, inp.width, inp.color, inp.interpolation),
                                batch_size)
            for p, f in zip(chunk, feats):
                buf = io.BytesIO()
                np.save(buf, f.astype(np.float32))
                written.append(atomic_write(out_dir, f"{p.stem}.npy", buf.getvalue()))
            if progress is not None:
                progress(len(written), len(paths))
    return written
