"""TFLite conversion and execution: vectors match Keras per precision, any batch size works, the cache converts once."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from simsearch.models import tflite_exec
from simsearch.models.tflite_exec import ConversionError, TFLiteRunner, convert_keras_to_tflite, load_or_convert

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")

SIZE = 32


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(_normalised(a) * _normalised(b), axis=1)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _build_model():
    """A small MobileNet-like net whose activations stay in a sane range with random weights (unlike deep nets)."""
    from simsearch.models._keras import keras

    k = keras()
    k.utils.set_random_seed(0)
    inp = k.Input((SIZE, SIZE, 3))
    h = k.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inp)
    h = k.layers.BatchNormalization()(h)
    h = k.layers.DepthwiseConv2D(3, padding="same", activation="relu6")(h)
    h = k.layers.Conv2D(48, 1, activation="relu")(h)
    out = k.layers.GlobalAveragePooling2D()(h)
    return k.Model(inp, out)


@pytest.fixture(scope="module")
def model():
    return _build_model()


@pytest.fixture(scope="module")
def fp32_bytes(model) -> bytes:
    return convert_keras_to_tflite(model, "fp32")


def _tensor_dtypes(runner: TFLiteRunner) -> set[str]:
    return {np.dtype(d["dtype"]).name for d in runner._shards[0].it.get_tensor_details()}


@pytest.mark.parametrize("n", [1, 3, 32])
def test_fp32_matches_keras_for_any_batch_size(model, fp32_bytes: bytes, n: int) -> None:
    runner = TFLiteRunner(fp32_bytes, num_threads=2)
    assert runner.input_size == SIZE and runner.dim == 48
    x = _images(n, seed=n)
    got = runner(x)
    assert got.shape == (n, 48) and got.dtype == np.float32
    assert _row_cosines(got, model.predict(x, verbose=0)).min() >= 0.999


def test_runner_switches_batch_sizes_and_returns_fresh_arrays(model, fp32_bytes: bytes) -> None:
    runner = TFLiteRunner(fp32_bytes)
    a, b = _images(5, seed=1), _images(2, seed=2)
    ya = runner(a)
    ya_before = ya.copy()
    yb = runner(b)
    ya_again = runner(a)
    np.testing.assert_array_equal(ya, ya_before)  # a later call must not overwrite an earlier result
    np.testing.assert_allclose(ya_again, ya, rtol=1e-5, atol=1e-7)
    assert yb.shape == (2, 48)
    assert _row_cosines(yb, model.predict(b, verbose=0)).min() >= 0.999


@pytest.mark.parametrize(("threads", "micro"), [(1, 32), (2, 2), (3, 1)])
def test_parallel_interpreters_and_micro_batches_give_the_one_interpreter_result(
    fp32_bytes: bytes, threads: int, micro: int
) -> None:
    reference = TFLiteRunner(fp32_bytes, num_threads=1, micro_batch=64)
    runner = TFLiteRunner(fp32_bytes, num_threads=threads, micro_batch=micro)
    for n in (1, 2, 7, 17):
        x = _images(n, seed=10 + n)
        want = reference(x)
        np.testing.assert_allclose(runner(x), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(runner.submit(x).result(), want, rtol=1e-5, atol=1e-6)


def test_runner_is_safe_to_share_between_threads(fp32_bytes: bytes) -> None:
    from concurrent.futures import ThreadPoolExecutor

    runner = TFLiteRunner(fp32_bytes, num_threads=2)
    batches = [_images(1 + k % 5, seed=100 + k) for k in range(24)]
    alone = [runner(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        shared = list(pool.map(runner, batches))
        submitted = [f.result() for f in [runner.submit(b) for b in batches]]
    for a, b, c in zip(alone, shared, submitted, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)


def test_runner_rejects_wrong_input_shape(fp32_bytes: bytes) -> None:
    runner = TFLiteRunner(fp32_bytes)
    with pytest.raises(ValueError):
        runner(np.zeros((2, SIZE + 1, SIZE, 3), np.float32))
    with pytest.raises(ValueError):
        runner(np.zeros((0, SIZE, SIZE, 3), np.float32))


def test_fp16_stores_half_precision_weights_and_matches(model) -> None:
    runner = TFLiteRunner(convert_keras_to_tflite(model, "fp16"))
    assert "float16" in _tensor_dtypes(runner)
    x = _images(8, seed=3)
    assert _row_cosines(runner(x), model.predict(x, verbose=0)).min() >= 0.95


def test_int8_with_representative_data_is_quantised_with_float_io(model) -> None:
    calls = []

    def representative():
        calls.append(1)
        for i in range(4):
            yield _images(4, seed=100 + i)

    runner = TFLiteRunner(convert_keras_to_tflite(model, "int8", representative))
    assert calls, "the representative dataset was never read"
    assert "int8" in _tensor_dtypes(runner)
    x = _images(8, seed=4)
    got = runner(x)
    assert got.dtype == np.float32 and got.shape == (8, 48)
    assert _row_cosines(got, model.predict(x, verbose=0)).min() >= 0.95


def test_int8_with_an_empty_representative_dataset_fails_instead_of_staying_float(model) -> None:
    with pytest.raises(ConversionError, match="no images"):
        convert_keras_to_tflite(model, "int8", lambda: iter([]))


def test_unknown_precision_is_rejected(model) -> None:
    with pytest.raises(ValueError, match="precision"):
        convert_keras_to_tflite(model, "int4")


def test_conversion_failure_raises_conversion_error() -> None:
    class NotAModel:
        inputs = [type("T", (), {"shape": (None, SIZE, SIZE, 3)})()]

        def export(self, *args, **kwargs):
            raise RuntimeError("export\nexploded")

    with pytest.raises(ConversionError, match="export exploded"):
        convert_keras_to_tflite(NotAModel())


def test_load_or_convert_converts_once(tmp_path, model) -> None:
    calls = []

    def build():
        calls.append(1)
        return model

    first = load_or_convert(tmp_path, "tiny", build)
    assert first == tmp_path / "tiny-fp32.tflite" and first.is_file()
    assert first.stat().st_mode & 0o777 == 0o644
    mtime = first.stat().st_mtime_ns
    second = load_or_convert(tmp_path, "tiny", build)
    assert second == first and len(calls) == 1 and second.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-fp32.tflite"]  # no temp files left behind
    assert TFLiteRunner(second).dim == 48


def test_load_or_convert_replaces_a_damaged_cache_file(tmp_path, model) -> None:
    (tmp_path / "tiny-fp32.tflite").write_bytes(b"\x00" * 16)
    calls = []
    path = load_or_convert(tmp_path, "tiny", lambda: calls.append(1) or model)
    assert calls == [1]
    assert TFLiteRunner(path).dim == 48


def test_default_cache_dir_honours_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SIMSEARCH_CACHE", str(tmp_path / "c"))
    assert tflite_exec.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SIMSEARCH_CACHE")
    assert tflite_exec.default_cache_dir().parts[-3:] == (".cache", "simsearch", "tflite")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_model_file_raises_a_clear_error(tmp_path, fp32_bytes: bytes, damage: str) -> None:
    path = tmp_path / "bad.tflite"
    path.write_bytes(b"this is not a flatbuffer" * 10 if damage == "garbage" else fp32_bytes[: len(fp32_bytes) // 2])
    with pytest.raises((ValueError, ConversionError)):
        TFLiteRunner(path)


def _half_available() -> bool:
    return tflite_exec.native_fp16() and importlib.util.find_spec("ai_edge_litert.compiled_model") is not None


needs_native_fp16 = pytest.mark.skipif(not _half_available(), reason="this CPU has no native float16 arithmetic")


@needs_native_fp16
def test_half_runner_computes_in_float16_and_matches_keras_for_any_batch_size(model, fp32_bytes: bytes) -> None:
    half = tflite_exec.HalfRunner(fp32_bytes, num_threads=2, micro_batch=4)
    full = TFLiteRunner(fp32_bytes, num_threads=1)
    assert half.input_size == SIZE and half.dim == 48
    for n in (1, 3, 4, 9):  # below, at and across micro-batches
        x = _images(n, seed=200 + n)
        got = half(x)
        assert got.shape == (n, 48) and got.dtype == np.float32
        assert _row_cosines(got, model.predict(x, verbose=0)).min() >= 0.99
        np.testing.assert_array_equal(half.submit(x).result(), got)  # one model, one path: identical results
    x = _images(6, seed=7)
    assert not np.array_equal(half(x), full(x)), "float16 was asked for but float32 arithmetic ran"


def test_make_runner_uses_float32_without_native_float16(fp32_bytes: bytes, monkeypatch) -> None:
    monkeypatch.setenv("SIMSEARCH_NATIVE_FP16", "0")
    tflite_exec.native_fp16.cache_clear()
    try:
        assert not tflite_exec.native_fp16()
        assert isinstance(tflite_exec.make_runner(fp32_bytes, half=True), TFLiteRunner)
        from simsearch.models.embedder import resolve_precision

        assert resolve_precision("auto") == "fp32" and resolve_precision("int8") == "int8"
        monkeypatch.setenv("SIMSEARCH_NATIVE_FP16", "1")
        tflite_exec.native_fp16.cache_clear()
        assert resolve_precision("auto") == "fp16" and resolve_precision("auto", engine="keras") == "fp32"
    finally:
        monkeypatch.delenv("SIMSEARCH_NATIVE_FP16")
        tflite_exec.native_fp16.cache_clear()


@needs_native_fp16
def test_half_runner_leaves_no_native_log_lines_on_stderr(fp32_bytes: bytes, tmp_path) -> None:
    import subprocess
    import sys

    model = tmp_path / "m.tflite"
    model.write_bytes(fp32_bytes)
    code = (
        "import atexit, sys, numpy as np\n"
        "atexit.register(lambda: sys.stderr.write('last words\\n'))\n"  # Python's own exit output still shows
        "from simsearch.models.tflite_exec import HalfRunner\n"
        "r = HalfRunner(sys.argv[1])\n"
        f"print(r(np.zeros((2, {SIZE}, {SIZE}, 3), np.float32)).shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 48)" and done.stderr == "last words\n"


@needs_native_fp16
def test_a_model_that_overflows_float16_runs_in_float32() -> None:
    """Activations beyond float16's range (65504) would give inf/NaN vectors: the probe keeps such a model on
    float32, and a batch that still overflows is recomputed in float32."""
    from simsearch.models._keras import keras

    k = keras()
    inp = k.Input((SIZE, SIZE, 3))
    big = k.layers.Conv2D(8, 3, kernel_initializer=k.initializers.Constant(50.0))(inp)
    big = k.layers.Conv2D(8, 3, kernel_initializer=k.initializers.Constant(50.0))(big)
    data = convert_keras_to_tflite(k.Model(inp, k.layers.GlobalAveragePooling2D()(big)), "fp32")
    runner = tflite_exec.make_runner(data, half=True)
    runner.name = "tflite-fp16"
    np.testing.assert_allclose(runner(_images(8, seed=6)), TFLiteRunner(data)(_images(8, seed=6)), rtol=1e-5)
    assert runner.name == "tflite-fp16"  # the probe failed: still float32 after a bulk call
    half = tflite_exec.HalfRunner(data)
    assert not half.agrees()
    got = half(_images(3, seed=5))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, half.float32_runner()(_images(3, seed=5)), rtol=1e-5)


@needs_native_fp16
def test_float16_starts_with_the_first_bulk_call(fp32_bytes: bytes) -> None:
    """A one-image call (a query) runs float32, without LiteRT's start-up; from the first call of 8 or more
    images on, every call runs float16."""
    runner = tflite_exec.make_runner(fp32_bytes, half=True)
    runner.name = "tflite-fp16"
    full, half = TFLiteRunner(fp32_bytes), tflite_exec.HalfRunner(fp32_bytes)
    one = _images(1, seed=30)
    np.testing.assert_array_equal(runner(one), full(one))
    assert runner.name == "tflite-fp16"
    bulk = _images(8, seed=31)
    np.testing.assert_array_equal(runner.submit(bulk).result(), half(bulk))
    assert runner.name == "tflite-fp16-native"
    np.testing.assert_array_equal(runner(one), half(one))
