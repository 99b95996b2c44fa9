"""Fleet builds on a Ray cluster: every stage of every manifest runs as a Ray task.

The driver keeps each manifest's plan, output folder and lock; a task gets the stage's upstream artifacts
from the shared cache, runs the stage in a scratch folder, pushes its outputs to the cache and returns their
hashes, and the driver restores them from the cache and commits them. CPU stages are spread over the cluster;
a stage with a ``placement`` (the TensorRT engine with ``targets.tensorrt.gpu``) asks for that GPU name as a
Ray custom resource, so it runs only on nodes started with ``ray start --resources '{"NVIDIA A10": 1}'``.
Workers read the manifests and their input files at the same paths as the driver (a shared checkout).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from . import errors, pipeline
from .fleet import ApplyOptions, ManifestResult, apply_one_safely, label, run_threads
from .errors import InputError, StageFailed, Unavailable

Emit = Callable[[pipeline.Event], None]


def import_ray() -> Any:
    try:
        import ray  # optional dependency
    except ImportError:
        raise Unavailable("--ray needs Ray: pip install 'reidbuild[ray]'") from None
    return ray


def _stage_named(manifest: str, name: str) -> tuple[Any, pipeline.Stage]:
    from .manifest import load_manifest
    from .stages.assemble import assemble

    lm = load_manifest(Path(manifest))
    for stage in assemble(lm).stages:
        if stage.name == name:
            return lm, stage
    raise InputError(f"{manifest}: no stage {name} (the manifest changed during the build?)")


def _ray_store(url: str) -> Any:
    """The cache as Ray tasks and the driver use it: required, since it is how artifacts travel."""
    from .cache import open_store

    return open_store(url, required=True, why_required="--ray carries artifacts between nodes through it")


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def probe_stage(manifest: str, name: str) -> dict[str, Any]:
    """Ray task: can this node run the stage? (Placed like the stage itself, so the answer is the node's.)"""
    _, stage = _stage_named(manifest, name)
    return {"unavailable": stage.available() if stage.available else None, "node": _node_id()}


def run_stage(manifest: str, name: str, fingerprint: str, upstream: dict[str, str], cache_url: str) -> dict[str, Any]:
    """Ray task: run one stage in a scratch folder fed from the cache, push its outputs, return their hashes."""
    from .fsutil import HashCache, atomic_write, sha256_bytes

    try:
        lm, stage = _stage_named(manifest, name)
        store = _ray_store(cache_url)
        logs: list[str] = []
        with tempfile.TemporaryDirectory(prefix="reidbuild-ray-") as tmp:
            data = store.fetch_blobs(upstream, name, None)
            if data is None:
                raise StageFailed(f"stage {name}: upstream artifacts not in the cache: {'; '.join(store.problems)}")
            for fname, blob in data.items():
                atomic_write(Path(tmp), fname, blob)
            inputs = pipeline.stage_inputs(stage, lm.base, HashCache())
            ctx = pipeline.StageContext(Path(tmp), {}, logs.append, inputs)
            result = stage.run(ctx)
            # an engine's key names this node's GPU and TensorRT: only here can its entry be written
            key = store.action_key(stage, fingerprint)
            if key is not None:
                store.push(stage, key, result, lambda ev: None)
            else:
                store.push_blobs(result.outputs, None)
        return {"outputs": {f: sha256_bytes(b) for f, b in result.outputs.items()}, "record": result.record,
                "failed": result.failed, "logs": logs,
                "node": _node_id()}
    except errors.ReidbuildError as exc:
        return {"error": [type(exc).__name__, exc.message], "node": _node_id()}


class RayRunner:
    """``pipeline.StageRunner`` for one manifest: each stage becomes a Ray task, placed by its ``placement``."""

    def __init__(self, ray: Any, manifest: Path, store: Any) -> None:
        self.ray = ray
        self.manifest = str(manifest.resolve())
        self.store = store
        self.placement: dict[str, str] = {}
        self._probe = ray.remote(probe_stage)
        self._run = ray.remote(run_stage)

    def _options(self, stage: pipeline.Stage) -> dict[str, Any]:
        gpu = stage.placement.get("gpu")
        if gpu:
            return {"resources": {gpu: 1}, "num_cpus": 1}
        return {"scheduling_strategy": "SPREAD", "num_cpus": 1}

    def unavailable(self, stage: pipeline.Stage) -> Optional[str]:
        """CPU stages: checked here (the cluster's CPU nodes share one environment); a placed stage: asked of
        a node that offers its resource."""
        if not stage.placement:
            return stage.available() if stage.available else None
        answer = self.ray.get(self._probe.options(**self._options(stage)).remote(self.manifest, stage.name))
        self.placement[stage.name] = answer["node"]
        why: Optional[str] = answer["unavailable"]
        return why

    def execute(self, stage: pipeline.Stage, fingerprint: str, ctx: pipeline.StageContext,
                committed: dict[str, dict[str, Any]]) -> pipeline.StageResult:
        if stage.reads_lock:  # it needs this run's lock records, which only this process has
            return stage.run(ctx)
        upstream = {f: e["sha256"] for f, e in committed.items()}
        ref = self._run.options(**self._options(stage)).remote(self.manifest, stage.name, fingerprint, upstream,
                                                               self.store.url)
        try:
            answer = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:  # a bug or crash in the task: report its own error
            raise (exc.cause if isinstance(exc.cause, BaseException) else exc) from None
        self.placement[stage.name] = answer["node"]
        if "error" in answer:
            kind, message = answer["error"]
            cls = getattr(errors, kind, errors.StageFailed)
            raise cls(f"{message} (on Ray node {answer['node'][:12]})")
        for line in answer["logs"]:
            ctx.log(line)
        data = self.store.fetch_blobs(answer["outputs"], stage.name, None)
        if data is None:
            raise StageFailed(f"stage {stage.name} ran on Ray node {answer['node'][:12]} but its outputs could not "
                              f"be read back from the cache: {'; '.join(self.store.problems[-1:])}")
        return pipeline.StageResult(data, answer["record"], answer["failed"])


def run_on_ray(paths: list[Path], opts: ApplyOptions, emit_for: Callable[[str], Emit],
               address: str) -> list[ManifestResult]:
    """Connect to the cluster and build every manifest, each driven from its own thread."""
    cache = opts.cache
    if not cache:
        raise InputError("--ray needs --cache URL (or REIDBUILD_CACHE): a cache every node can reach carries "
                         "the artifacts between nodes")
    ray = import_ray()
    ray.init(address=None if address == "local" else address, logging_level="WARNING",
             log_to_driver=False, ignore_reinit_error=True)
    try:
        def one(p: Path) -> ManifestResult:
            runner = RayRunner(ray, p, _ray_store(cache))
            result = apply_one_safely(p, opts, emit_for(label(p)), runner)
            result.placement = dict(runner.placement)
            return result

        return run_threads(paths, one)
    finally:
        ray.shutdown()
