"""Fast CPU inference: convert a Keras embedding model to TFLite once, cache it on disk, run it on XNNPACK.

On a 2-core machine TFLite with the XNNPACK delegate embeds several times faster than `keras.Model.predict`.
TensorFlow and LiteRT are imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import platform
import queue
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ._keras import quiet_native_stderr

PRECISIONS = ("fp32", "fp16", "int8")
_TFLITE_IDENT = b"TFL3"  # flatbuffer file identifier at bytes 4..8 of every .tflite file


class ConversionError(RuntimeError):
    """The Keras model could not be converted (or the converted model could not be loaded); one-line message."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def default_cache_dir() -> Path:
    """Where converted models live: `$SIMSEARCH_CACHE` if set, else `~/.cache/simsearch/tflite`."""
    env = os.environ.get("SIMSEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "simsearch" / "tflite"


def _input_shape(model: Any) -> tuple[int, ...]:
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ConversionError(f"expected an input of shape (None, S, S, C), got {shape}")
    return tuple(int(d) for d in shape[1:])


class _Calibration:
    """Adapt the caller's batches to what the calibrator wants (a list of one float32 array per model input) and
    count the images, because the converter silently skips quantisation when the dataset is empty."""

    def __init__(self, representative: Callable[[], Iterable[np.ndarray]]) -> None:
        self._representative = representative
        self.count = 0

    def __call__(self) -> Iterator[list[np.ndarray]]:
        for batch in self._representative():
            arr = np.asarray(batch, dtype=np.float32)
            if arr.ndim == 3:
                arr = arr[None]
            for i in range(len(arr)):  # one image at a time: the calibrator keeps the exported batch shape
                self.count += 1
                yield [np.ascontiguousarray(arr[i : i + 1])]


def convert_keras_to_tflite(
    model: Any,
    precision: str = "fp32",
    representative: Callable[[], Iterable[np.ndarray]] | None = None,
) -> bytes:
    """Convert a Keras 3 model with input (None, S, S, 3) to a TFLite flatbuffer with a resizable batch dimension.

    `fp16` stores float16 weights (half the file, float32 compute); `int8` is full post-training quantisation
    calibrated on `representative()` (float32 input and output kept), or dynamic-range quantisation without it.
    Goes through a SavedModel export because the converter cannot read Keras 3 models' variables directly.
    Raises ConversionError with a one-line message on any failure.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    from ._keras import tensorflow

    tf = tensorflow()
    shape = _input_shape(model)
    calibration = _Calibration(representative) if precision == "int8" and representative is not None else None
    try:
        with tempfile.TemporaryDirectory(prefix="simsearch-export-") as tmp, quiet_native_stderr():
            spec = tf.TensorSpec((None, *shape), tf.float32, name="images")
            with contextlib.redirect_stdout(io.StringIO()):
                model.export(tmp, format="tf_saved_model", verbose=False, input_signature=[spec])
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
            if precision == "fp16":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            elif precision == "int8":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                if calibration is not None:
                    converter.representative_dataset = calibration
            data = bytes(converter.convert())
        if calibration is not None and calibration.count == 0:
            raise ConversionError("int8 calibration failed: the representative dataset yielded no images")
        return data
    except ConversionError:
        raise
    except Exception as e:  # the converter raises many unrelated types (ConverterError, ValueError, TypeError, ...)
        raise ConversionError(f"TFLite {precision} conversion failed: {_one_line(e)}") from e


def _interpreter_class() -> tuple[Any, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "litert"
    except ImportError:
        from ._keras import tensorflow

        return tensorflow().lite.Interpreter, "tf.lite"


class _Interpreter:
    """One LiteRT interpreter with its own tensors; resizes its input only when the batch size changes."""

    def __init__(self, cls: Any, content: bytes, num_threads: int) -> None:
        try:
            with quiet_native_stderr(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice in the fallback
                self.it = cls(model_content=content, num_threads=num_threads)
                self.it.allocate_tensors()
        except Exception as e:
            raise ValueError(f"cannot load TFLite model: {_one_line(e)}") from e
        inputs, outputs = self.it.get_input_details(), self.it.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected one input and one output, got {len(inputs)} and {len(outputs)}")
        self.input, self.output = inputs[0], outputs[0]
        self.batch = int(self.input["shape"][0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) != self.batch:
            self.it.resize_tensor_input(self.input["index"], list(x.shape), strict=False)
            self.it.allocate_tensors()
            self.batch = len(x)
        self.it.set_tensor(self.input["index"], x)
        self.it.invoke()  # releases the GIL
        return np.array(self.it.get_tensor(self.output["index"]), dtype=np.float32, copy=True)


class _Runner:
    """What both runners share: the model's bytes (checked), thread and micro-batch counts, the pixel and vector
    shapes, and the check of a batch against them."""

    def _take(self, model: bytes | str | Path, num_threads: int | None, micro_batch: int) -> bytes:
        content = model if isinstance(model, (bytes, bytearray, memoryview)) else Path(model).read_bytes()
        content = bytes(content)
        if len(content) < 8 or content[4:8] != _TFLITE_IDENT:
            raise ValueError("not a TFLite model (missing the TFL3 identifier); delete the file to re-convert")
        self.model_bytes = content
        self.num_threads = max(1, int(num_threads or os.cpu_count() or 1))
        self.micro_batch = max(1, int(micro_batch))
        return content

    def _set_shapes(self, in_shape: list[int], dim: int) -> None:
        if len(in_shape) != 4 or in_shape[1] != in_shape[2]:
            raise ValueError(f"expected a square image input (N, S, S, C), got {in_shape}")
        self._pixel_shape = tuple(in_shape[1:])
        self._dim = int(dim)

    @property
    def input_size(self) -> int:
        return self._pixel_shape[0]

    @property
    def dim(self) -> int:
        return self._dim

    def _check(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self._pixel_shape or len(x) == 0:
            want = ", ".join(map(str, self._pixel_shape))
            raise ValueError(f"expected a batch of shape (N>=1, {want}), got {x.shape}")
        return x


class TFLiteRunner(_Runner):
    """Run a converted embedding model: float32 (N, S, S, 3) in, a fresh float32 (N, D) array out. Thread-safe.

    XNNPACK is the interpreter's default CPU delegate, so it is applied automatically. Two measured choices:

    * `num_threads` single-threaded interpreters instead of one interpreter that splits every operator across
      threads. A call runs contiguous slices of its batch on them at once (identical results); `submit` runs a
      whole batch on whichever interpreter is free, so a pipeline keeps every core on the model with no barrier
      between threads, and a decoder preempting one of them delays one batch rather than every operator.
    * Each interpreter invokes `micro_batch` images at a time: activations of a small batch stay in the core's
      cache. On a 2-core AMD EPYC, 2 instead of 32 per invoke ran EfficientNet-Lite0 at 398 instead of 336 img/s,
      MobileNetV2 572 vs 270, ResNet50 60 vs 48; 1 and 4 were within noise of 2, 8 and more were slower.

    A call of a single micro-batch (a query) runs on one more interpreter that uses all threads: 2.4 instead of 4.9
    ms for one Lite0 image.
    """

    def __init__(self, model: bytes | str | Path, num_threads: int | None = None, micro_batch: int = 2) -> None:
        content = self._take(model, num_threads, micro_batch)
        cls, self.backend = _interpreter_class()
        self._shards = [_Interpreter(cls, content, 1) for _ in range(self.num_threads)]
        self._set_shapes([int(d) for d in self._shards[0].input["shape"]], self._shards[0].output["shape"][-1])
        self._free: queue.SimpleQueue[_Interpreter] = queue.SimpleQueue()
        for shard in self._shards:
            self._free.put(shard)
        self._pool = ThreadPoolExecutor(self.num_threads, "simsearch-tflite")
        self._cls = cls
        self._wide: _Interpreter | None = None  # all threads on one invoke: for single images (queries)
        self._wide_lock = threading.Lock()
        self.name = "tflite"

    def _run(self, x: np.ndarray) -> np.ndarray:
        shard = self._free.get()
        try:
            m = self.micro_batch
            return np.concatenate([shard(x[i : i + m]) for i in range(0, len(x), m)])
        finally:
            self._free.put(shard)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = self._check(batch)
        k = min(len(self._shards), -(-len(x) // self.micro_batch))
        if k == 1 and self.num_threads > 1 and self._wide_lock.acquire(blocking=False):
            try:  # one micro-batch cannot be split across interpreters: split its operators instead (2x faster)
                if self._wide is None:
                    self._wide = _Interpreter(self._cls, self.model_bytes, self.num_threads)
                return self._wide(x)
            finally:
                self._wide_lock.release()
        bounds = [len(x) * i // k for i in range(k + 1)]
        futures = [self._pool.submit(self._run, x[bounds[i] : bounds[i + 1]]) for i in range(1, k)]
        first = self._run(x[: bounds[1]])
        return np.concatenate([first, *(f.result() for f in futures)]) if futures else first

    def submit(self, batch: np.ndarray) -> Future:
        """Run a whole batch on the next free interpreter; a Future of its (N, D) output."""
        return self._pool.submit(self._run, self._check(batch))


XNNPACK_FORCE_FP16 = 0x4  # TFLITE_XNNPACK_DELEGATE_FLAG_FORCE_FP16: run float32 operators in float16


@functools.cache
def native_fp16() -> bool:
    """Whether this CPU computes float16 natively (x86 AVX512-FP16, Arm FP16), where half-precision inference is
    faster instead of emulated. `SIMSEARCH_NATIVE_FP16=0` (or 1) overrides the detection."""
    forced = os.environ.get("SIMSEARCH_NATIVE_FP16")
    if forced in ("0", "1"):
        return forced == "1"
    if sys.platform == "darwin":
        return platform.machine() == "arm64"  # every Apple silicon core has FP16 arithmetic
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    return "avx512_fp16" in flags or {"fphp", "asimdhp"} <= flags


_LITERT_USED: list[bool] = []  # a CompiledModel was made: silence LiteRT's exit


def _quiet_exit() -> None:
    """Silence LiteRT's exit: its runtime logs a line per accelerator from C++ static destructors, after Python
    has finished. Registered after LiteRT is imported, so it runs before the other exit handlers: file descriptor 2
    goes to /dev/null for native code, and `sys.stderr` moves to a copy of the real stderr, so Python's own last
    words (other exit handlers, ignored exceptions) still show; a logging handler made earlier keeps the old stream,
    so its lines after this point are lost. SIMSEARCH_DEBUG=1 keeps everything."""
    if not _LITERT_USED or os.environ.get("SIMSEARCH_DEBUG"):
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        real = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        return
    sys.stderr = open(real, "w", buffering=1, errors="backslashreplace")  # noqa: SIM115 (lives until exit)


@functools.cache
def _litert_environment() -> Any:
    """One LiteRT environment for every model, kept for the process: each environment loads the accelerators and
    logs it, and again when destroyed (a model made and dropped would log mid-run)."""
    try:
        from ai_edge_litert import compiled_model

        return compiled_model._create_default_environment()
    except Exception:  # a LiteRT without it: each model makes its own
        return None


class HalfRunner(_Runner):
    """Run a converted model in float16 arithmetic on a CPU that has it natively: LiteRT's CompiledModel with
    XNNPACK's forced-FP16 mode. Same interface as `TFLiteRunner`.

    Measured on a 2-core Xeon with AVX512-FP16, EfficientNet-Lite0: 5.6 instead of 9.7 CPU-ms per image, vectors
    at cosine >= 0.998 (mean 0.9999) of float32 ones. The CompiledModel holds the GIL while it runs, so one model
    splits each operator over all threads (instead of one interpreter per thread) and runs `micro_batch` images
    per call, short enough that decoding threads get the GIL between calls.
    """

    def __init__(
        self, model: bytes | str | Path, num_threads: int | None = None, micro_batch: int = 8,
        float32: TFLiteRunner | None = None,
    ) -> None:  # fmt: skip
        content = self._take(model, num_threads, micro_batch)
        self.backend = "litert-compiled-fp16"
        try:
            with quiet_native_stderr():
                from ai_edge_litert.compiled_model import CompiledModel
                from ai_edge_litert.cpu_options import CpuOptions
                from ai_edge_litert.options import Options

                cpu = CpuOptions(num_threads=self.num_threads, xnnpack_flags=XNNPACK_FORCE_FP16)
                options = Options(cpu_options=cpu)
                self._model = CompiledModel.from_buffer(content, environment=_litert_environment(), options=options)
                if not self._model.is_fully_accelerated():  # operators outside XNNPACK: keep to float32
                    raise ValueError("XNNPACK does not run every operator of this model")
                self._setup()
            if not _LITERT_USED:
                _LITERT_USED.append(True)
                atexit.register(_quiet_exit)
        except Exception as e:
            raise ValueError(f"cannot load TFLite model for float16: {_one_line(e)}") from e
        self._float32 = float32
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, "simsearch-fp16")
        self.name = "tflite-fp16"

    def _setup(self) -> None:
        """Learn the input and output shapes and run once (LiteRT sets up its buffer runtime, and logs, on first
        use: the caller silences it)."""
        key = next(iter(self._model.get_signature_list()))
        inputs, outputs = self._model.get_input_tensor_details(key), self._model.get_output_tensor_details(key)
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected one input and one output, got {len(inputs)} and {len(outputs)}")
        (inp,), (out,) = inputs.values(), outputs.values()
        self._set_shapes([int(d) for d in inp["shape"]], out["shape"][-1])
        self._batch = 0
        self._buffers: tuple[Any, Any] | None = None
        self._invoke(np.zeros((1, *self._pixel_shape), np.float32))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            self._buffers = None
            self._model = None

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("the model is closed")
        if len(x) != self._batch or self._buffers is None:
            self._model.resize_input_tensor(0, list(x.shape), 0)
            self._buffers = (self._model.create_input_buffers(0), self._model.create_output_buffers(0))
            self._batch = len(x)
        ins, outs = self._buffers
        ins[0].write(x)
        self._model.run_by_index(0, ins, outs)
        return np.array(outs[0].read(len(x) * self._dim, np.float32), np.float32).reshape(len(x), self._dim)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = self._check(batch)
        m = self.micro_batch
        with self._lock:
            out = np.concatenate([self._invoke(x[i : i + m]) for i in range(0, len(x), m)])
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():  # float16 overflowed on these images (a model with large activations): float32 for them
            out[bad] = self.float32_runner()(x[bad])
        return out

    def float32_runner(self) -> TFLiteRunner:
        """The same model in float32 arithmetic (made on first use): the reference and the overflow fallback."""
        with self._lock:
            if self._float32 is None:
                self._float32 = TFLiteRunner(self.model_bytes, self.num_threads)
            return self._float32

    def agrees(self, min_cosine: float = 0.99) -> bool:
        """Whether float16 gives this model's float32 vectors on a probe batch (smooth and noisy images in [-1,
        1]): a model whose activations overflow float16, or lose too much to it, fails."""
        s = self.input_size
        ramp = np.broadcast_to(np.linspace(-1, 1, s, dtype=np.float32)[None, :, None], (s, s, 3))
        noise = np.random.default_rng(0).uniform(-1, 1, (s, s, 3)).astype(np.float32)
        x = np.stack([ramp, noise, 0.5 * ramp.transpose(1, 0, 2) + 0.5 * noise])
        with self._lock:
            half = self._invoke(x)
        full = self.float32_runner()(x)
        if not (np.isfinite(half).all() and np.isfinite(full).all()):
            return False
        num = (half * full).sum(axis=1)
        den = np.linalg.norm(half, axis=1) * np.linalg.norm(full, axis=1)
        return bool(np.all(num >= min_cosine * np.maximum(den, 1e-30)))

    def submit(self, batch: np.ndarray) -> Future:
        """Run a batch after the ones already submitted; a Future of its (N, D) output."""
        return self._pool.submit(self, batch)


def _debug(message: str) -> None:
    if os.environ.get("SIMSEARCH_DEBUG"):
        print(f"simsearch: {message}", file=sys.stderr)


class BulkHalfRunner:
    """Float32 (`TFLiteRunner`) until the first call of `bulk` images or more, float16 (`HalfRunner`) from then on.

    LiteRT's CompiledModel costs 0.7 s to start (most of it importing ml_dtypes): worth it for indexing, not for a
    one-image query from a fresh process (0.7 s instead of 1.4 s on a small index). The vectors of the two
    arithmetics agree at cosine >= 0.998. If float16 fails its probe (see `make_runner`), float32 stays.
    """

    def __init__(self, model: bytes | str | Path, num_threads: int | None = None, bulk: int = 8) -> None:
        self._full = TFLiteRunner(model, num_threads)
        self.model_bytes, self.num_threads, self.bulk = self._full.model_bytes, self._full.num_threads, bulk
        self._half: HalfRunner | None = None
        self._tried = False
        self._switch = threading.Lock()
        self.label = "tflite"

    @property
    def name(self) -> str:
        return self.label + ("-native" if self._half is not None else "")

    @name.setter
    def name(self, value: str) -> None:
        self.label = value

    @property
    def input_size(self) -> int:
        return self._full.input_size

    @property
    def dim(self) -> int:
        return self._full.dim

    def _runner(self, n: int) -> Any:
        if self._half is None and not self._tried and n >= self.bulk:
            with self._switch:
                if not self._tried:
                    try:
                        self._half = _checked_half(self.model_bytes, self.num_threads, self._full)
                    finally:
                        self._tried = True  # once: a failed switch is not retried batch after batch
        return self._half or self._full

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._runner(len(batch))(batch)

    def submit(self, batch: np.ndarray) -> Future:
        return self._runner(len(batch)).submit(batch)


def _checked_half(model: bytes, num_threads: int | None, float32: TFLiteRunner | None = None) -> HalfRunner | None:
    """A HalfRunner that agrees with float32 on the probe batch, or None (with the reason under SIMSEARCH_DEBUG).
    Any failure of LiteRT here means float32, never an error."""
    try:
        runner = HalfRunner(model, num_threads, float32=float32)
        if runner.agrees():
            return runner
        _debug("float16 vectors differ from float32 ones on a probe batch; float32")
    except Exception as e:  # LiteRT missing, a model it cannot run, a runtime error on the probe
        _debug(f"float16 arithmetic unavailable ({_one_line(e)}); float32")
    return None


def make_runner(model: bytes | str | Path, num_threads: int | None = None, half: bool = False) -> Any:
    """The runner for a converted model: with `half` on a CPU that computes float16 natively, a `BulkHalfRunner`
    (float16 from the first bulk call on, if the model passes the probe), else `TFLiteRunner` (float32)."""
    if half and native_fp16():
        return BulkHalfRunner(model, num_threads)
    return TFLiteRunner(model, num_threads)


_SAFE_KEY = re.compile(r"[^A-Za-z0-9._=+-]")


def _cache_path(cache_dir: Path, key: str, precision: str, calibrated: bool) -> Path:
    # Dynamic-range int8 gives other vectors than calibrated int8, so the two must not share a cache file.
    suffix = "int8-dynamic" if precision == "int8" and not calibrated else precision
    return Path(cache_dir) / f"{_SAFE_KEY.sub('_', key)}-{suffix}.tflite"


def _looks_valid(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[4:8] == _TFLITE_IDENT


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cache file is readable like any other
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable; not supported everywhere
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_or_convert(
    cache_dir: Path,
    key: str,
    build_model: Callable[[], Any],
    precision: str = "fp32",
    representative: Callable[[], Iterable[np.ndarray]] | None = None,
) -> Path:
    """Return the cached `<cache_dir>/<key>-<precision>.tflite`, converting `build_model()` only on a miss.

    `key` must identify the model (architecture, weights, input size); calibration data is not part of it.
    Int8 without representative data is cached as `<key>-int8-dynamic.tflite`. A file that is not a TFLite
    model (e.g. truncated by a crash elsewhere) is treated as a miss and replaced.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    path = _cache_path(cache_dir, key, precision, representative is not None)
    if _looks_valid(path):
        return path
    data = convert_keras_to_tflite(build_model(), precision, representative)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, data)
    except OSError as e:
        raise ConversionError(f"cannot write the converted model to {path}: {_one_line(e)}") from e
    return path
