"""Backbone registry: names and sizes from Keras, builds with weights=None, pooling, user model files, errors."""

from __future__ import annotations

import numpy as np
import pytest

from simsearch.errors import BadInputError, WeightsUnavailableError
from simsearch.models.backbones import (
    DEFAULT_BACKBONE,
    list_backbones,
    load_backbone,
    normalise_name,
    resolve,
    rmac_regions,
)

# A representative sample (one per family) builds in the default run; SIMSEARCH_ALL_BACKBONES=1 builds all.
SAMPLE = ["vgg16", "resnet50_v2", "mobilenet_v3_small", "densenet121", "efficientnet_b0", "convnext_tiny"]


def test_registry_has_every_keras_application_with_native_sizes() -> None:
    names = {b.name: b for b in list_backbones()}
    assert list(names)[0] == DEFAULT_BACKBONE
    for n in ("vgg16", "vgg19", "resnet50", "resnet101_v2", "inception_v3", "inception_resnet_v2", "xception",
              "mobilenet", "mobilenet_v2", "mobilenet_v3_large", "densenet201", "efficientnet_b7",
              "efficientnet_v2_s", "convnext_base", "nasnet_large", "nasnet_mobile"):  # fmt: skip
        assert n in names, n
    sizes = {n: names[n].input_size for n in ("vgg16", "inception_v3", "xception", "efficientnet_b3",
                                              "efficientnet_v2_m", "nasnet_large", "resnet50")}  # fmt: skip
    assert sizes == {"vgg16": 224, "inception_v3": 299, "xception": 299, "efficientnet_b3": 300,
                     "efficientnet_v2_m": 480, "nasnet_large": 331, "resnet50": 224}  # fmt: skip
    assert names["efficientnet-lite0"].offline and names["efficientnet-lite0"].dim == 1280


def test_names_are_forgiving() -> None:
    assert resolve("ResNet50V2").name == "resnet50_v2"
    assert resolve("efficientnet_lite0").name == "efficientnet-lite0"
    assert resolve("MobileNet-V3-Small").name == "mobilenet_v3_small"
    assert normalise_name("EfficientNet_B0") == "efficientnetb0"
    with pytest.raises(BadInputError, match="unknown backbone"):
        resolve("alexnet")


@pytest.mark.parametrize("name", SAMPLE)
def test_sample_builds_with_random_weights(name: str) -> None:
    bb = load_backbone(name, weights=None, input_size=64)
    x = bb.preprocess(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8))
    y = np.asarray(bb.model(x))
    assert y.shape == (2, bb.dim) and np.isfinite(y).all()
    assert bb.dim == resolve(name).dim  # the listing's dims match what the model really outputs


def _conv_model_file(tmp_path, size: int = 48):
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((size, size, 3))
    feat = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inp)
    path = tmp_path / "mine.keras"
    keras.Model(inp, feat).save(path)
    return path


def test_pooling_modes_differ_and_builds_are_reproducible(tmp_path) -> None:
    path = _conv_model_file(tmp_path)
    x = np.random.default_rng(1).integers(0, 256, (1, 48, 48, 3)).astype(np.uint8)
    outs = {}
    for pooling in ("avg", "max", "gem"):
        bb = load_backbone(str(path), pooling=pooling, preprocess="unit")
        outs[pooling] = np.asarray(bb.model(bb.preprocess(x)))[0]
    assert np.all(outs["avg"] <= outs["gem"] + 1e-6) and np.all(outs["gem"] <= outs["max"] + 1e-6)
    assert not np.allclose(outs["avg"], outs["gem"]) and not np.allclose(outs["gem"], outs["max"])
    a = load_backbone("mobilenet_v2", weights=None, input_size=64, seed=5)
    b = load_backbone("mobilenet_v2", weights=None, input_size=64, seed=5)
    for wa, wb in zip(a.model.weights, b.model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(wa), np.asarray(wb))
    with pytest.raises(BadInputError):
        load_backbone("mobilenet_v3_small", weights=None, pooling="median")


def test_rmac_regions_of_square_and_oblong_maps() -> None:
    assert rmac_regions(7, 7) == [(0, 0, 7, 7)] + [(y, x, 4, 4) for y in (0, 3) for x in (0, 3)] + [
        (y, x, 3, 3) for y in (0, 2, 4) for x in (0, 2, 4)
    ]
    wide = rmac_regions(7, 10)
    assert wide[0] == (0, 1, 7, 7) and len(wide) == 1 + 2 * 3 + 3 * 4
    assert all(y + h <= 7 and x + w <= 10 for y, x, h, w in wide)


def test_rmac_pooling_sums_normalised_region_maxima(tmp_path) -> None:
    import keras

    path = _conv_model_file(tmp_path)
    x = np.random.default_rng(2).integers(0, 256, (2, 48, 48, 3)).astype(np.uint8)
    bb = load_backbone(str(path), pooling="rmac", preprocess="unit")
    got = np.asarray(bb.model(bb.preprocess(x)))
    fmap = np.asarray(keras.saving.load_model(path)(bb.preprocess(x)))  # (2, 23, 23, 8)
    want = np.zeros((2, 8), np.float32)
    for y0, x0, h, w in rmac_regions(23, 23):
        r = fmap[:, y0 : y0 + h, x0 : x0 + w].max(axis=(1, 2))
        want += r / np.linalg.norm(r, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mx = np.asarray(load_backbone(str(path), pooling="max", preprocess="unit").model(bb.preprocess(x)))
    cos = np.sum(got * mx, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(mx, axis=1)
    assert np.all(cos < 0.9999)  # regions weigh in: not just global max pooling


def test_user_keras_model_file_is_a_backbone(tmp_path) -> None:
    import keras

    inp = keras.Input((48, 48, 3))
    feat = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    path = tmp_path / "mine.keras"
    keras.Model(inp, feat).save(path)
    bb = load_backbone(str(path), preprocess="unit")
    assert bb.input_size == 48 and bb.dim == 8 and bb.info.family == "file"
    y = np.asarray(bb.model(bb.preprocess(np.full((1, 48, 48, 3), 255, np.uint8))))
    assert y.shape == (1, 8)


def test_local_weights_file_for_a_keras_application(tmp_path) -> None:
    src = load_backbone("mobilenet_v3_small", weights=None, input_size=64, seed=11)
    wfile = tmp_path / "mine.weights.h5"
    # the constructor's own model (without our pooling head) is what a weights file must fit
    inner = src.model.get_layer(index=0)
    del inner
    base = src.model
    import keras

    feature_model = keras.Model(base.input, base.get_layer("simsearch_pool").input)
    feature_model.save_weights(wfile)
    loaded = load_backbone("mobilenet_v3_small", weights=str(wfile), input_size=64)
    x = src.preprocess(np.random.default_rng(2).integers(0, 256, (1, 64, 64, 3)).astype(np.uint8))
    np.testing.assert_allclose(np.asarray(loaded.model(x)), np.asarray(src.model(x)), rtol=1e-4, atol=1e-5)
    assert loaded.weights_digest != src.weights_digest


def test_missing_imagenet_weights_give_one_clear_message(monkeypatch, tmp_path) -> None:
    import keras.src.applications.vgg16 as vgg16

    def offline(*args, **kwargs):
        raise Exception(
            "URL fetch failure on https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5: None -- [Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr(vgg16.file_utils, "get_file", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as e:
        load_backbone("vgg16", weights="imagenet", input_size=64)
    msg = str(e.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg and "--weights PATH" in msg
    assert str(tmp_path) in msg and "\n" not in msg


def test_missing_weights_file_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="weights file not found"):
        load_backbone("mobilenet_v3_small", weights="/nonexistent/w.h5")
