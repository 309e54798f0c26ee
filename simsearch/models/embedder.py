"""Turn images into L2-normalised float32 embeddings, streaming files through parallel decoders in batches.

Decoding (Pillow releases the GIL) runs in worker threads while the model runs on the previous batch, so both cores
stay busy and memory stays bounded by a fixed window of decoded images.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..images import FITS, ImageLoadError, load_encoded, load_image, open_file
from ..media.video import sniff_video
from ..sources import is_url
from .backbones import DEFAULT_BACKBONE, DEFAULT_POOLING, Backbone, BackboneSpec, resolve_backbone

DEFAULT_FIT = "resize"
ENGINES = ("auto", "tflite", "keras")
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_PRECISION = "fp32"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


@dataclass
class FileRecord:
    """One file through the pipeline: its identity, and either a vector, a reused hash, or an error."""

    path: str
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""
    width: int = 0
    height: int = 0
    vector: np.ndarray | None = None
    error: str | None = None
    known: bool = False  # content hash already in the index: not decoded, the stored vector is reused
    frame_times: list[float] | None = None  # a video: the times of its sampled frames (seconds)
    frames: np.ndarray | None = None  # ... and their vectors; `vector` is then their normalised mean
    video: dict[str, Any] | None = None  # ... and its duration, bit rate and codec


@dataclass
class EmbedResult:
    """Vectors for the inputs that could be read, in input order, and one-line errors for the rest."""

    vectors: np.ndarray
    sources: list[Any] = field(default_factory=list)
    errors: list[tuple[Any, str]] = field(default_factory=list)


class _KerasEngine:
    def __init__(self, backbone: Backbone) -> None:
        from ._keras import tensorflow

        tf = tensorflow()
        s = backbone.input_size
        self._fn = tf.function(backbone.model, input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32)])
        self.name = "keras"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(batch))


def _tflite_key(backbone: Backbone, fit: str) -> str:
    digest = hashlib.sha256(repr(sorted(backbone.signature().items())).encode() + f"|{fit}".encode()).hexdigest()[:20]
    return f"{backbone.name.replace('/', '_')[-40:]}-{digest}"


def resolve_precision(precision: str, engine: str = "auto") -> str:
    """`auto` is fp16 where the CPU computes float16 natively (the TFLite engine runs it there, 1.7x faster per
    image, vectors at cosine >= 0.998 of fp32), else fp32; other values are returned as they are."""
    if precision != "auto":
        return precision
    import importlib.util

    from .tflite_exec import native_fp16

    if engine == "keras" or not native_fp16():
        return "fp32"
    try:
        runnable = importlib.util.find_spec("ai_edge_litert.compiled_model") is not None
    except (ImportError, ValueError):
        runnable = False
    return "fp16" if runnable else "fp32"


def _file_precision(precision: str) -> str:
    """Which converted file a precision runs: native float16 arithmetic runs the float32 file (same speed as the
    float16-weights one, and no second conversion); elsewhere fp16 means float16 weights, float32 arithmetic."""
    from .tflite_exec import native_fp16

    return "fp32" if precision == "fp16" and native_fp16() else precision


def _cached_tflite(backbone: Backbone, precision: str, fit: str, calibrated: bool) -> Path | None:
    from . import tflite_exec

    precision = _file_precision(precision)
    path = tflite_exec._cache_path(tflite_exec.default_cache_dir(), _tflite_key(backbone, fit), precision, calibrated)
    return path if tflite_exec._looks_valid(path) else None


def _tflite_engine(backbone: Backbone, precision: str, fit: str, representative: Callable | None) -> Any:
    from . import tflite_exec

    path = _cached_tflite(backbone, precision, fit, representative is not None)
    if path is None:
        if backbone.model is None:
            backbone = backbone.spec.build()
        path = tflite_exec.load_or_convert(
            tflite_exec.default_cache_dir(), _tflite_key(backbone, fit),
            lambda: backbone.model, precision=_file_precision(precision), representative=representative,
        )  # fmt: skip
    runner = tflite_exec.make_runner(path, half=precision == "fp16")
    runner.name = f"tflite-{precision}"  # a BulkHalfRunner adds "-native" once it computes in float16
    return runner


class Embedder:
    """A backbone plus an execution engine plus the image pipeline; reuse one for many calls."""

    def __init__(
        self,
        backbone: str | BackboneSpec | Backbone = DEFAULT_BACKBONE,
        weights: str | Path | None = "imagenet",
        pooling: str = DEFAULT_POOLING,
        fit: str = DEFAULT_FIT,
        batch_size: int = 32,
        engine: str = "auto",
        precision: str = DEFAULT_PRECISION,
        workers: int | None = None,
        seed: int = 0,
        input_size: int | None = None,
        representative: Iterable[Any] | None = None,
    ) -> None:
        if fit not in FITS:
            raise BadInputError(f"unknown fit {fit!r}; choose one of {', '.join(FITS)}")
        if engine not in ENGINES:
            raise BadInputError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        precision = resolve_precision(precision, engine)
        if precision not in PRECISIONS:
            choices = ", ".join((*PRECISIONS, "auto"))
            raise BadInputError(f"unknown precision {precision!r}; choose one of {choices}")
        if engine == "keras" and precision == "int8":
            raise BadInputError("--precision int8 needs the tflite engine")  # fp16: Keras computes it in float32
        self.backbone = backbone if isinstance(backbone, Backbone) else None
        if self.backbone is None:
            spec = (
                backbone
                if isinstance(backbone, BackboneSpec)
                else resolve_backbone(str(backbone), weights, pooling, input_size, seed)
            )
            if engine != "keras" and spec.family in ("lite", "trained") and spec.dim is not None:
                # A cached TFLite model needs neither TensorFlow nor the Keras model.
                described = Backbone(spec, None, spec.preprocess_fn(), spec.dim)
                calibrated = precision == "int8" and representative is not None
                if _cached_tflite(described, precision, fit, calibrated):
                    self.backbone = described
            if self.backbone is None:
                self.backbone = spec.build()
        self.fit = fit
        self.batch_size = max(1, int(batch_size))
        # one decoder more than cores keeps the queue full while the model runs (measured: +3% on 2 cores)
        self.workers = workers or max(2, min(8, (os.cpu_count() or 1) + 1))
        self.precision = precision
        self._lock = threading.Lock()
        self._serial: ThreadPoolExecutor | None = None
        self.engine = self._make_engine(engine, precision, representative)

    def _make_engine(self, engine: str, precision: str, representative: Iterable[Any] | None) -> Any:
        if engine == "keras":
            return _KerasEngine(self.backbone)
        rep = None
        if precision == "int8" and representative is not None:
            items = list(representative)
            size = self.backbone.input_size

            def rep() -> Iterator[np.ndarray]:
                for item in items:
                    try:
                        yield self.backbone.preprocess(load_image(item, size, self.fit)[None])
                    except ImageLoadError:
                        continue

        try:
            return _tflite_engine(self.backbone, precision, self.fit, rep)
        except Exception as e:  # any conversion or runtime failure: the Keras path still gives the same vectors
            if engine == "tflite":
                raise BadInputError(f"TFLite engine unavailable for {self.backbone.name}: {_one_line(e)}") from e
            print(f"simsearch: warning: TFLite conversion failed ({_one_line(e)}); using Keras", file=sys.stderr)
            if self.precision == "int8":  # fp16 stays: float32 arithmetic gives its vectors (cosine >= 0.998)
                self.precision = "fp32"
            if self.backbone.model is None:
                self.backbone = self.backbone.spec.build()
            return _KerasEngine(self.backbone)

    @property
    def engine_name(self) -> str:
        return getattr(self.engine, "name", "tflite")

    def signature(self) -> dict[str, Any]:
        """What must match between an index and the embedder that adds to or queries it."""
        return {**self.backbone.signature(), "fit": self.fit, "precision": self.precision}

    @property
    def dim(self) -> int:
        return self.backbone.dim

    def embed_video(self, path: str | os.PathLike) -> tuple[dict[str, Any], list[float], np.ndarray]:
        """A video's info, its sampled frames' times and their vectors (see `media.video` for the sampling)."""
        info, times, pixels = decode_video(os.fspath(path), self.backbone.input_size, self.fit)
        vecs = np.concatenate([self.embed_pixels(pixels[i : i + self.batch_size])
                               for i in range(0, len(pixels), self.batch_size)])  # fmt: skip
        return info, times, vecs

    def embed_pixels(self, batch: np.ndarray) -> np.ndarray:
        """Embed a uint8 (N, S, S, 3) batch already at the model's input size."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._run(np.ascontiguousarray(self.backbone.preprocess(batch), dtype=np.float32))

    def _load(self, item: Any) -> np.ndarray:
        return load_image(item, self.backbone.input_size, self.fit)

    def embed(self, items: Iterable[Any]) -> EmbedResult:
        """Embed paths, PIL images or arrays; unreadable inputs are reported in `errors`, never raised."""
        items = list(items)
        vecs, ok, errors = [], [], []
        for chunk in _chunks(list(enumerate(items)), self.batch_size * 8):
            pixels = []
            with ThreadPoolExecutor(self.workers) as pool:
                loaded = list(pool.map(lambda it: _try(self._load, it[1]), chunk))
            for (_i, item), (arr, err) in zip(chunk, loaded, strict=True):
                if err is None:
                    pixels.append(arr)
                    ok.append(item)
                else:
                    errors.append((item, err))
            for b in _chunks(pixels, self.batch_size):
                vecs.append(self.embed_pixels(np.stack(b)))
        v = np.concatenate(vecs) if vecs else np.zeros((0, self.dim), np.float32)
        return EmbedResult(v, ok, errors)

    def embed_one(self, item: Any) -> np.ndarray:
        """Embed a single image; raises BadInputError with a one-line message when it cannot be read."""
        try:
            return self.embed_pixels(self._load(item)[None])[0]
        except ImageLoadError as e:
            raise BadInputError(str(e)) from e

    def embed_variants(self, paths: Iterable[str]) -> Iterator[tuple[str, np.ndarray | None]]:
        """(path, (4, dim) vectors of the image rotated 90/180/270 degrees and mirrored), streamed.

        Rotating the model-input square equals resizing the rotated image (for every fit), so each file is decoded
        once. Unreadable files give None.
        """
        s, fit = self.backbone.input_size, self.fit
        with ThreadPoolExecutor(self.workers) as pool:
            for chunk in _chunks(list(paths), self.batch_size * 4):
                arrays = list(pool.map(lambda p: _try(lambda q: load_image(q, s, fit), p)[0], chunk))
                ok = [(p, a) for p, a in zip(chunk, arrays, strict=True) if a is not None]
                pixels = [v for _, a in ok for v in (np.rot90(a, 1), np.rot90(a, 2), np.rot90(a, 3), a[:, ::-1])]
                vecs = [self.embed_pixels(np.ascontiguousarray(np.stack(b))) for b in _chunks(pixels, self.batch_size)]
                allv = np.concatenate(vecs) if vecs else np.zeros((0, self.dim), np.float32)
                got = {p: allv[4 * k : 4 * k + 4] for k, (p, _) in enumerate(ok)}
                for p in chunk:
                    yield p, got.get(p)

    def embed_files(
        self,
        paths: Iterable[str],
        known_hash: Callable[[str], bool] | None = None,
        prefetch: int | None = None,
    ) -> Iterator[list[FileRecord]]:
        """Stream files: read each once (stat, sha256, decode), embed in batches, yield records batch by batch.

        Three stages overlap: worker threads decode, this thread assembles and preprocesses batches (and runs the
        caller's work on each yielded batch), and the model runs whole batches on its own threads (one per TFLite
        interpreter, so every core can run the model while the decoders wait). Files whose sha256 `known_hash`
        accepts are not decoded (their stored vector is reused by the caller). At most `prefetch` decoded images
        plus a few batches are held at once, so memory is flat in the number of files.
        """
        window = prefetch or self.batch_size * 3
        s, fit = self.backbone.input_size, self.fit
        depth = getattr(self.engine, "num_threads", 1) + 2  # batches queued or running on the model at once

        def work(path: str) -> tuple[FileRecord, np.ndarray | None]:
            return _read_and_decode(path, s, fit, known_hash)

        in_flight: deque[tuple[list[tuple[FileRecord, np.ndarray | None]], Future | None]] = deque()

        def submit(batch: list[tuple[FileRecord, np.ndarray | None]]) -> None:
            arrays = [a if a.ndim == 4 else a[None] for _, a in batch if a is not None]  # a video brings its frames
            x = np.ascontiguousarray(self.backbone.preprocess(np.concatenate(arrays)), np.float32) if arrays else None
            in_flight.append((batch, None if x is None else self._submit(x)))

        def collect(block: bool) -> Iterator[list[FileRecord]]:
            while in_flight and (block or len(in_flight) >= depth or _ready(in_flight[0][1])):
                batch, fut = in_flight.popleft()
                yield _attach(batch, None if fut is None else l2_normalise(fut.result()))

        with ThreadPoolExecutor(self.workers, thread_name_prefix="simsearch-decode") as pool:
            pending: deque[Future] = deque()
            it = iter(paths)
            batch: list[tuple[FileRecord, np.ndarray | None]] = []
            exhausted = False
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        pending.append(pool.submit(work, next(it)))
                    except StopIteration:
                        exhausted = True
                if not pending:
                    break
                batch.append(pending.popleft().result())
                if sum(_count(a) for _, a in batch) >= self.batch_size or (exhausted and not pending):
                    submit(batch)
                    batch = []
                    yield from collect(block=False)
            if batch:
                submit(batch)
        yield from collect(block=True)

    def _submit(self, x: np.ndarray) -> Future:
        """Start the model on a preprocessed batch: on a free TFLite interpreter, or on one Keras thread."""
        if hasattr(self.engine, "submit"):
            return self.engine.submit(x)
        if self._serial is None:
            self._serial = ThreadPoolExecutor(1, thread_name_prefix="simsearch-infer")
        return self._serial.submit(self._call_engine, x)

    def _call_engine(self, x: np.ndarray) -> np.ndarray:
        if hasattr(self.engine, "submit"):  # thread-safe on its own
            return self.engine(x)
        with self._lock:
            return self.engine(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return l2_normalise(self._call_engine(x))


def _ready(fut: Future | None) -> bool:
    return fut is None or fut.done()


def _count(a: np.ndarray | None) -> int:
    return 0 if a is None else (len(a) if a.ndim == 4 else 1)


def _attach(batch: list[tuple[FileRecord, np.ndarray | None]], vecs: np.ndarray | None) -> list[FileRecord]:
    """Give each decoded record its vector (in order; a video its frames' vectors and their mean)."""
    if vecs is not None:
        i = 0
        for rec, a in batch:
            n = _count(a)
            if a is not None and a.ndim == 4:
                rec.frames = vecs[i : i + n]
                rec.vector = l2_normalise(rec.frames.mean(axis=0, keepdims=True))[0]
            elif a is not None:
                rec.vector = vecs[i]
            i += n
    return [rec for rec, _ in batch]


def _read_and_decode(
    path: str, size: int, fit: str, known_hash: Callable[[str], bool] | None
) -> tuple[FileRecord, np.ndarray | None]:
    rec = FileRecord(path)
    if is_url(path):
        return _read_remote(rec, size, fit, known_hash)
    try:
        with open_file(path) as f:  # a FIFO or device swapped in since the walk is refused, never read
            st = os.fstat(f.fileno())
            rec.size, rec.mtime_ns = st.st_size, st.st_mtime_ns
            if sniff_video(f.read(64)):
                return _read_video(rec, f, size, fit, known_hash)
            f.seek(0)
            data = f.read()
    except ImageLoadError as e:
        rec.error = e.reason
        return rec, None
    except OSError as e:
        rec.error = f"cannot read: {e.strerror or e}"
        return rec, None
    return _decode_bytes(rec, data, size, fit, known_hash)


def _read_remote(
    rec: FileRecord, size: int, fit: str, known_hash: Callable[[str], bool] | None
) -> tuple[FileRecord, np.ndarray | None]:
    """An object in object storage: read whole (this worker's own request), then like a local file."""
    from ..sources.remote import read_object

    try:
        data, rec.size, rec.mtime_ns = read_object(rec.path)
    except Exception as e:  # the store's client raises its own errors (network, permissions, vanished object)
        rec.error = f"cannot read: {_one_line(e)}"
        return rec, None
    if sniff_video(data[:64]):
        return _read_video(rec, io.BytesIO(data), size, fit, known_hash)
    return _decode_bytes(rec, data, size, fit, known_hash)


def _decode_bytes(
    rec: FileRecord, data: bytes, size: int, fit: str, known_hash: Callable[[str], bool] | None
) -> tuple[FileRecord, np.ndarray | None]:
    """Hash a still image's bytes; decode them unless that content is indexed already."""
    rec.sha256 = hashlib.sha256(data).hexdigest()
    if known_hash is not None and known_hash(rec.sha256):
        rec.known = True
        return rec, None
    try:
        pixels, (rec.width, rec.height) = load_encoded(data, size, fit, name=rec.path)
        return rec, pixels
    except ImageLoadError as e:
        rec.error = _strip_path(str(e), rec.path)
    except Exception as e:  # Pillow raises many types for malformed files; any of them is a per-file error
        rec.error = _one_line(e)
    return rec, None


def _read_video(
    rec: FileRecord, f: Any, size: int, fit: str, known_hash: Callable[[str], bool] | None
) -> tuple[FileRecord, np.ndarray | None]:
    """A video: hashed as it streams (never read whole), then its sampled frames at the model's input size."""
    h = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(1 << 22):
        h.update(chunk)
    rec.sha256 = h.hexdigest()
    if known_hash is not None and known_hash(rec.sha256):
        rec.known = True
        return rec, None
    f.seek(0)
    try:
        rec.video, rec.frame_times, pixels = decode_video(f, size, fit)  # the descriptor hashed, not the path again
    except ImageLoadError as e:
        rec.error = _strip_path(str(e), rec.path)
        return rec, None
    except Exception as e:  # FFmpeg raises its own errors for damaged files: a per-file error, never fatal
        rec.error = f"corrupt or unreadable video ({_one_line(e)})"
        return rec, None
    rec.width, rec.height = rec.video["width"], rec.video["height"]
    return rec, pixels


def decode_video(source: Any, size: int, fit: str) -> tuple[dict[str, Any], list[float], np.ndarray]:
    """(info, frame times, (n, size, size, 3) uint8 frames) of a video: a path or an open binary file."""
    from ..media.video import sample_frames

    info, frames = sample_frames(source, size=max(size, 64))
    pixels = np.stack([load_image(im, size, fit) for _, im in frames])
    meta = {"width": info.width, "height": info.height, "duration": round(info.duration_s, 3),
            "bit_rate": info.bit_rate, "codec": info.codec}  # fmt: skip
    return meta, [round(t, 3) for t, _ in frames], pixels


def _strip_path(msg: str, path: str) -> str:
    for prefix in (f"{path}: ", f"{path}:"):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _try(fn: Callable[[Any], np.ndarray], item: Any) -> tuple[np.ndarray | None, str | None]:
    try:
        return fn(item), None
    except ImageLoadError as e:
        return None, str(e)


def _chunks(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


_EMBEDDERS: dict[tuple, Embedder] = {}


def embed(
    items: Iterable[Any],
    backbone: str | Path = DEFAULT_BACKBONE,
    weights: str | Path | None = "imagenet",
    pooling: str = DEFAULT_POOLING,
    fit: str = DEFAULT_FIT,
    engine: str = "auto",
    precision: str = DEFAULT_PRECISION,
    batch_size: int = 32,
) -> EmbedResult:
    """Embed paths, PIL images or uint8 arrays with a (cached) Embedder; see `Embedder.embed`.

    `backbone` is a registry name, a `.keras` file or a MODEL_DIR written by `simsearch train`.
    """
    from .model_dir import MANIFEST_FILE

    stamp = Path(backbone, MANIFEST_FILE).stat().st_mtime_ns if Path(backbone, MANIFEST_FILE).is_file() else 0
    key = (str(backbone), stamp, str(weights), pooling, fit, engine, precision)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = Embedder(str(backbone), weights, pooling, fit, batch_size, engine, precision)
    return _EMBEDDERS[key].embed(items)
