"""`simsearch index --ray`: the embedding stage of a sync, run by Ray Data actors on a laptop or a cluster.

`sync_folder` plans the work (new, changed, removed, moved files) and commits it exactly as in a local run; only its
"embed these paths" stage is replaced. `RayEmbedder.embed_files` splits the paths into shards and a fixed pool of
Ray Data actors embeds them. Each actor builds one embedder for its lifetime from the driver's converted TFLite model,
shipped as bytes (workers need neither TensorFlow nor the model cache), and reads, hashes, decodes and embeds every
file with the same functions as local indexing, so vectors and per-file errors are the same. Shards come back in
order as `FileRecord` batches and go through sync's commit path: a killed run resumes without re-embedding committed
shards because sync skips committed files.

Workers open files by path: the folder must be on a filesystem that every node mounts at the same path, or in
object storage (s3://, ...), which every worker reads itself with the credentials of its own environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..models.backbones import Backbone, BackboneSpec
from ..models.embedder import Embedder, FileRecord
from ..sources import is_url
from .store import IndexStore
from .sync import ProgressFn, SyncInterrupted, SyncReport, sync_folder

INSTALL_HINT = 'pip install "simsearch[ray]"'
CALLS_PER_ACTOR = 2  # shards an actor embeds at once: one decodes while the other's batches are on the model
SHARDS_PER_WORKER = 4  # at least this many shards per actor when the folder is small, so no actor idles at the end
_PATH_ERROR = "simsearch-worker-path-error: "  # marks our message inside Ray's wrapped exception text


def require_ray() -> Any:
    """Import Ray Data, or fail with a one-line message saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise BadInputError(f"--ray needs Ray Data, which is not installed ({e}); install: {INSTALL_HINT}") from None
    return ray


def connect(address: str) -> tuple[str, bool]:
    """Join (or start, for "local") a Ray cluster; returns its address and whether this call started Ray.

    The job ships this simsearch package to the workers (Ray's `py_modules`), so they run the driver's code; its
    dependencies must be installed on every node. An already initialised Ray (a caller's own `ray.init`) is used as
    it is and left running: its workers must then import the same simsearch themselves.
    """
    ray = require_ray()
    if not ray.is_initialized():
        package = Path(__file__).resolve().parents[1]
        kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
        if address == "local":
            # A local Ray's processes inherit this environment: putting this simsearch first on their path gives the
            # same code as shipping it, without a job runtime_env (with one, Ray starts fresh workers: ~1.3 s more).
            kwargs["include_dashboard"] = False
            env = {"PYTHONPATH": os.pathsep.join([str(package.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
        else:
            kwargs["runtime_env"] = {"py_modules": [str(package)]}
            env = {}
        try:
            with _environ(env):
                ray.init(address=address, **kwargs)
        except Exception as e:  # ConnectionError, ValueError, RuntimeError depending on the address form
            raise BadInputError(f"cannot connect to Ray at {address!r}: {_one_line(e)}") from None
        started = True
    else:
        started = False
    # Ray Data logs each failure with its traceback; the CLI reports it on one line instead (explain_failure).
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    if address.startswith("ray://"):
        return address, started
    return str(ray.get_runtime_context().gcs_address), started


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (for the processes it starts), then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plan_workers(nodes: list[dict[str, Any]], workers: int | None) -> tuple[int, int]:
    """(actors, CPUs per actor): one actor per node by default, each as wide as the smallest node allows."""
    cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes if n.get("Alive")]
    cpus = [c for c in cpus if c >= 1]
    if not cpus:
        raise BadInputError("the Ray cluster has no node with a CPU to run embedding workers")
    n = workers or len(cpus)
    if n > sum(cpus):
        raise BadInputError(f"--workers {n} needs {n} CPUs; the Ray cluster has {sum(cpus)}")
    return n, max(1, min(min(cpus), sum(cpus) // n))


def make_shards(paths: list[str], shard_size: int, workers: int) -> list[list[str]]:
    """Consecutive slices of `paths`: at most `shard_size` each, smaller when that would leave actors idle."""
    if not paths:
        return []
    size = max(1, min(shard_size, -(-len(paths) // (workers * SHARDS_PER_WORKER))))
    return [paths[i : i + size] for i in range(0, len(paths), size)]


class WorkerPathError(BadInputError):
    """A worker cannot see the folder: it is not on a filesystem shared by every node at the same path."""


class _ShippedEmbedder(Embedder):
    """An Embedder whose engine is a TFLite model received as bytes instead of the local cache (or a conversion)."""

    def __init__(self, backbone: Backbone, model: bytes, threads: int, **options: Any) -> None:
        self._model, self._threads = model, threads
        super().__init__(backbone, **options)

    def _make_engine(self, engine: str, precision: str, representative: Iterable[Any] | None) -> Any:
        from ..models.tflite_exec import make_runner

        runner = make_runner(self._model, num_threads=self._threads, half=precision == "fp16")
        runner.name = f"tflite-{precision}"
        return runner


def worker_payload(embedder: Embedder, threads: int) -> dict[str, Any]:
    """What an actor needs to rebuild the driver's embedder: the spec, the options, and the TFLite bytes (if any)."""
    return {
        "spec": embedder.backbone.spec,
        "dim": embedder.dim,
        "fit": embedder.fit,
        "precision": embedder.precision,
        "batch_size": embedder.batch_size,
        "threads": threads,
        "model": getattr(embedder.engine, "model_bytes", None),  # None: the driver runs Keras, so do the workers
    }


def build_worker_embedder(payload: dict[str, Any]) -> Embedder:
    """The embedder of one actor: the same backbone, preprocessing and image pipeline as the driver's."""
    spec: BackboneSpec = payload["spec"]
    threads = int(payload["threads"])
    options = {"fit": payload["fit"], "batch_size": payload["batch_size"], "workers": threads + 1}
    if payload["model"] is None:
        return Embedder(spec, engine="keras", **options)
    described = Backbone(spec, None, spec.preprocess_fn(), int(payload["dim"]))
    return _ShippedEmbedder(described, payload["model"], threads, precision=payload["precision"], **options)


class EmbedShards:
    """The Ray Data callable class: one embedder per actor, one shard (a row holding a list of paths) per call."""

    def __init__(self, payload: dict[str, Any]) -> None:
        import ray

        if payload.get("model_ref") is not None:
            payload = {**payload, "model": ray.get(payload["model_ref"][0])}
        self.embedder = build_worker_embedder(payload)
        self.dim = int(payload["dim"])
        self.node = str(ray.get_runtime_context().get_node_id())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        began = time.time()  # wall clock, comparable across processes (and, with NTP, nodes)
        paths = [str(p) for shard in batch["paths"] for p in shard]
        check_readable(paths)
        records = [r for part in self.embedder.embed_files(paths) for r in part]
        out = records_to_columns(records, self.dim)
        out["began"], out["ended"] = np.full(len(records), began), np.full(len(records), time.time())
        out["node"] = np.array([self.node] * len(records), dtype=object)  # where this shard ran
        return out


def check_readable(paths: list[str]) -> None:
    """Fail the whole job, not each file, when this worker cannot see the folder the shard's files are in."""
    if not paths or any(is_url(p) for p in paths):  # object storage: every worker reads the objects itself
        return
    root = os.path.commonpath(paths)
    if root in paths:
        root = os.path.dirname(root)
    if not os.path.isdir(root):
        raise WorkerPathError(
            f"{_PATH_ERROR}a Ray worker on {socket.gethostname()} cannot read {root}: --ray opens files by path on "
            f"the workers, so the folder must be on a filesystem every node mounts at the same path"
        )


def records_to_columns(records: list[FileRecord], dim: int) -> dict[str, np.ndarray]:
    """FileRecords as the numpy columns Ray Data moves between processes."""
    vectors = np.zeros((len(records), dim), np.float32)
    has = np.zeros(len(records), bool)
    for i, r in enumerate(records):
        if r.vector is not None:
            vectors[i], has[i] = r.vector, True
    # a video's frames travel with it, pickled (times, vectors, info): Ray Data keeps bytes columns as they are
    video = np.array([pickle.dumps((r.frame_times, r.frames, r.video)) if r.frames is not None else b""
                      for r in records], dtype=object)  # fmt: skip
    return {
        "path": np.array([r.path for r in records], dtype=object),
        "size": np.array([r.size for r in records], np.int64),
        "mtime_ns": np.array([r.mtime_ns for r in records], np.int64),
        "sha256": np.array([r.sha256 for r in records], dtype=object),
        "width": np.array([r.width for r in records], np.int64),
        "height": np.array([r.height for r in records], np.int64),
        "error": np.array([r.error or "" for r in records], dtype=object),
        "has_vector": has,
        "vector": vectors,
        "video": video,
    }


def columns_to_records(batch: dict[str, np.ndarray]) -> list[FileRecord]:
    """The inverse of `records_to_columns`."""
    out = []
    for i in range(len(batch["path"])):
        vec = np.array(batch["vector"][i], dtype=np.float32) if batch["has_vector"][i] else None
        out.append(FileRecord(
            str(batch["path"][i]), int(batch["size"][i]), int(batch["mtime_ns"][i]), str(batch["sha256"][i]),
            int(batch["width"][i]), int(batch["height"][i]), vec, str(batch["error"][i]) or None,
        ))  # fmt: skip
        video = batch["video"][i] if "video" in batch else b""
        if isinstance(video, (bytes, bytearray)) and video:
            times, frames, info = pickle.loads(video)  # written by records_to_columns in a worker of this job
            out[-1].frame_times, out[-1].frames, out[-1].video = list(times), np.asarray(frames), info
    return out


class RayEmbedder:
    """Stands in for an Embedder in `sync_folder`: the same `embed_files` contract, the work done by Ray actors.

    `embedder` (or a zero-argument factory of it) is the driver's embedder; it is built only when a sync has files
    to embed, and Ray is joined only then, so a no-op sync starts neither. Unlike local embedding, files whose
    content is already indexed (moves, copies) are decoded on the workers too, because the driver's hash table is
    not shipped; sync still reuses their stored vectors, so the index is the same.
    """

    def __init__(
        self,
        embedder: Embedder | Callable[[], Embedder],
        address: str = "local",
        workers: int | None = None,
        shard_size: int = 256,
    ) -> None:
        if workers is not None and workers < 1:
            raise BadInputError("--workers must be at least 1")
        self._embedder = embedder
        self.address = address
        self.requested_workers = workers
        self.shard_size = max(1, int(shard_size))
        # address, workers, shards; after a run also start_s and steady_img_s (see _timings)
        self.info: dict[str, Any] = {"address": address, "workers": 0, "shards": 0}
        self._started = False
        self._batches: Any = None
        # per-shard sub-indexes merged on the driver: on a cluster of more cores than this machine, from
        # MERGE_MIN_VECTORS; SIMSEARCH_RAY_MERGE=1 forces it at any size (tests, benchmarks/distributed.py)
        self.force_merge = os.environ.get("SIMSEARCH_RAY_MERGE") == "1"
        self.merge_min = 0 if self.force_merge else MERGE_MIN_VECTORS

    def embed_files(
        self, paths: Iterable[str], known_hash: Callable[[str], bool] | None = None
    ) -> Iterator[list[FileRecord]]:
        """Yield the records of each shard, in shard order, as `Embedder.embed_files` yields its batches."""
        paths = list(paths)
        if not paths:
            return
        t0 = time.time()
        emb = self._embedder if isinstance(self._embedder, Embedder) else self._embedder()
        ray = require_ray()
        address, started = connect(self.address)
        self._started = self._started or started
        workers, threads = plan_workers(ray.nodes(), self.requested_workers)
        shards = make_shards(paths, self.shard_size, workers)
        self.info = {"address": address, "workers": workers, "shards": len(shards)}
        payload = worker_payload(emb, threads)
        model_ref = None
        if payload["model"] is not None:  # in the object store once, fetched by each actor (not a constructor arg)
            model_ref = ray.put(payload["model"])
            payload = {**payload, "model": None, "model_ref": [model_ref]}
        ds = _dataset(ray, shards).map_batches(
            EmbedShards,
            batch_size=1,
            compute=_actor_pool(ray, workers),
            num_cpus=threads,
            fn_constructor_kwargs={"payload": payload},
        )
        self._batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        span = [float("inf"), 0.0, 0]  # first shard began, last shard ended (on the workers), files
        per_node: dict[str, int] = {}
        self.info["nodes"] = sum(1 for n in ray.nodes() if n.get("Alive"))
        self.info["shards_per_node"] = per_node
        try:
            for batch in self._batches:
                records = columns_to_records(batch)
                if "node" in batch and len(batch["node"]):
                    node = str(batch["node"][0])
                    per_node[node] = per_node.get(node, 0) + 1
                if records:
                    span = [
                        min(span[0], batch["began"].min()),
                        max(span[1], batch["ended"].max()),
                        span[2] + len(records),
                    ]
                if known_hash is not None:
                    for r in records:
                        r.known = r.error is None and known_hash(r.sha256)
                yield records
            if span[2]:
                self.info.update(_timings(t0, *span))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            raise explain_failure(e) from None
        finally:
            del model_ref

    def close(self) -> None:
        """Stop a job left unfinished (Ctrl-C, an error) and shut Ray down if this embedder started it."""
        batches, self._batches = self._batches, None
        if batches is not None and hasattr(batches, "close"):
            batches.close()
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _timings(t0: float, began: float, ended: float, files: int) -> dict[str, float]:
    """start_s: seconds from the embedding stage's start until a worker began its first shard (Ray and the actors
    starting); steady_img_s: files over the time the workers took, first shard begun to last ended - the rate a long
    run approaches. Times are wall clocks (`time.time()`) of the driver and the workers."""
    return {"start_s": round(float(began - t0), 3), "steady_img_s": round(float(files / max(ended - began, 1e-9)), 1)}


MERGE_MIN_VECTORS = 200_000  # below this the serial fill takes seconds: not worth shipping vectors


def _fill_on_ray(remote: RayEmbedder, index: Any, ids: np.ndarray, read: Callable) -> dict[str, Any] | None:
    """Fill an inverted-file structure through per-shard sub-indexes on Ray (index.merge), when the cluster has
    more cores than this machine: on one machine FAISS already fills on every core, and shipping the vectors
    only adds time (benchmarks/distributed.py --merge). None leaves the fill to the driver."""
    from .merge import fill_with_ray, is_ivf

    ray = require_ray()
    if not ray.is_initialized() or len(ids) < remote.merge_min or not is_ivf(index):
        return None
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if cpus <= (os.cpu_count() or 1) and not remote.force_merge:
        return None
    info = fill_with_ray(ray, index, read, ids, remote.info.get("workers") or 1)
    remote.info["merge"] = info
    return {"by": "ray", **info}


def _actor_pool(ray: Any, workers: int) -> Any:
    """A fixed pool of `workers` actors, each embedding CALLS_PER_ACTOR shards at once, so that it does not idle
    between shards; older Ray Data runs one shard at a time."""
    try:
        return ray.data.ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                          enable_true_multi_threading=True)  # fmt: skip
    except TypeError:
        return ray.data.ActorPoolStrategy(size=workers)


ACTOR_START_TIMEOUT_S = 300  # loading the model on a busy node can take a while; plan_workers checked the CPUs


def _dataset(ray: Any, shards: list[list[str]]) -> Any:
    """One row, and one block, per shard."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shard order = local order: same ids, resume from a prefix
    ctx.enable_progress_bars = False  # sync reports progress itself
    if hasattr(ctx, "wait_for_min_actors_s"):  # start once every actor is up: the first one would take every shard
        ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    rows = [{"paths": s} for s in shards]
    try:
        return ray.data.from_items(rows, override_num_blocks=len(shards))
    except TypeError:  # Ray Data before 2.10 named it `parallelism`
        return ray.data.from_items(rows, parallelism=len(shards))


def explain_failure(e: BaseException) -> BaseException:
    """A one-line error for a failed Ray job: ours when a worker could not read the folder, else Ray's first line."""
    text = str(e)
    if _PATH_ERROR in text:
        return WorkerPathError(text.split(_PATH_ERROR, 1)[1].splitlines()[0])
    return BadInputError(f"the Ray job failed: {type(e).__name__}: {_one_line(e)}")


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def sync_with_ray(
    store: IndexStore,
    embedder: Embedder | Callable[[], Embedder],
    folder: str | Path,
    address: str,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    commit_every: int = 256,
) -> SyncReport:
    """`sync_folder` with its embedding on Ray; the report gains a `ray` entry (address, workers, shards).

    Ray prints its cluster's error notices (e.g. actors killed on Ctrl-C) on stdout; during the call they go to
    stderr, so that stdout stays the CLI's report.
    """
    require_ray()
    remote = RayEmbedder(embedder, address, workers, shard_size=commit_every)
    store.fill_structure = lambda index, ids, read: _fill_on_ray(remote, index, ids, read)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            try:
                report = sync_folder(store, lambda: remote, folder, progress=progress, commit_every=commit_every)
            finally:
                store.fill_structure = None
                remote.close()
    except SyncInterrupted as e:
        e.report.ray = remote.info
        raise
    report.ray = remote.info
    return report
