"""Test-time augmentation (TTA) built into a trained model: one image in, one averaged embedding out.

`flip`: the image and its horizontal mirror; `flip-crop`: also its 80% centre crop (10% off every side) resized
back to the input size, and that crop's mirror. Both are closed under mirroring, so an image and its mirror get the
same vector (up to float rounding); the 3-view recipe first measured in `benchmarks/transfer_objects.py` (plain,
flip, crop) is not. The model embeds every view (one batch of views x images through the same network), and
returns the L2-normalised sum of the views' L2-normalised embeddings. Because the views are layers of the saved
model, the Keras and TFLite paths, indexing and querying all get them with no change.

The views operate on the model's input: preprocessed pixels at the input size. Preprocessing is an affine map per
channel, and flipping, cropping and bilinear resizing commute with it, so `view_pixels` (used by training to embed
the views of raw pixels with the frozen backbone) computes the same views as the saved model, with the same op.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TTA_MODES = ("none", "flip", "flip-crop")
DEFAULT_TTA = "flip-crop"
CROP = 0.8  # the centre crop's side, as a share of the input's side
_VIEWS = {"none": ("plain",), "flip": ("plain", "flip"), "flip-crop": ("plain", "flip", "crop", "crop-flip")}


def views_of(tta: str) -> tuple[str, ...]:
    """The views a TTA mode averages, in order ("plain" first)."""
    if tta not in _VIEWS:
        from ..errors import BadInputError

        raise BadInputError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_MODES)}")
    return _VIEWS[tta]


def _crop_box(size: int, crop: float) -> tuple[int, int]:
    """(offset, side) of the centre crop of a `size` x `size` image."""
    off = int(round(size * (1.0 - crop) / 2))
    return off, size - 2 * off


def _view(x: Any, view: str, crop: float = CROP) -> Any:
    """One view of an NHWC batch (a tensor or an array), as Keras ops: what the model and training both run."""
    from ._keras import keras

    ops = keras().ops
    if view == "plain":
        return x
    if view == "flip":
        return ops.flip(x, axis=2)
    if view in ("crop", "crop-flip"):
        size = int(x.shape[1])
        off, side = _crop_box(size, crop)
        out = ops.image.resize(x[:, off : off + side, off : off + side, :], (size, size), interpolation="bilinear")
        return ops.flip(out, axis=2) if view == "crop-flip" else out
    raise ValueError(f"unknown view {view!r}")


def view_pixels(batch: np.ndarray, view: str) -> np.ndarray:
    """One view of a (N, S, S, 3) pixel batch, float32, computed with the same op as the model's TTA layer."""
    x = np.ascontiguousarray(batch, dtype=np.float32)
    if view == "plain":
        return x
    return np.asarray(_view(x, view), dtype=np.float32)


_classes: dict[str, Any] = {}


def _layer_classes() -> dict[str, Any]:
    """The two Keras layers of the TTA (registered for saving and loading on first use)."""
    if _classes:
        return _classes
    from ._keras import keras

    k = keras()

    @k.saving.register_keras_serializable(package="simsearch")
    class TTAViews(k.layers.Layer):
        """(B, S, S, 3) -> (V*B, S, S, 3): the views of the batch, view after view."""

        def __init__(self, views: list[str] | tuple[str, ...] = ("plain",), crop: float = CROP, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.views, self.crop = list(views), float(crop)

        def call(self, x: Any) -> Any:
            return k.ops.concatenate([_view(x, v, self.crop) for v in self.views], axis=0)

        def compute_output_shape(self, shape: tuple) -> tuple:
            return (None if shape[0] is None else shape[0] * len(self.views), *shape[1:])

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "views": self.views, "crop": self.crop}

    @k.saving.register_keras_serializable(package="simsearch")
    class TTAMean(k.layers.Layer):
        """(V*B, D) -> (B, D): the L2-normalised sum of each image's V (L2-normalised) view embeddings."""

        def __init__(self, n_views: int = 1, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.n_views = int(n_views)

        def call(self, x: Any) -> Any:
            ops = k.ops
            x = x / ops.maximum(ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True)), 1e-12)
            s = ops.sum(ops.reshape(x, (self.n_views, -1, x.shape[-1])), axis=0)
            return s / ops.maximum(ops.sqrt(ops.sum(s * s, axis=-1, keepdims=True)), 1e-12)

        def compute_output_shape(self, shape: tuple) -> tuple:
            return (None, shape[-1])

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "n_views": self.n_views}

    _classes.update(TTAViews=TTAViews, TTAMean=TTAMean)
    return _classes


def register_tta_layers() -> None:
    _layer_classes()


def with_tta(model: Any, tta: str, input_size: int, name: str = "simsearch_trained") -> Any:
    """`model` (pixels -> unit embedding) with the views of `tta` averaged inside one Keras model (`none`: itself)."""
    from ._keras import keras

    k = keras()
    views = views_of(tta)
    if len(views) == 1:
        return model
    inp = k.Input((input_size, input_size, 3), name="image")
    c = _layer_classes()
    x = c["TTAViews"](views, CROP, name="tta_views")(inp)
    return k.Model(inp, c["TTAMean"](len(views), name="tta_mean")(model(x)), name=name)


def average_views(embeddings: list[np.ndarray]) -> np.ndarray:
    """What `TTAMean` computes, in NumPy: the L2-normalised sum of L2-normalised (N, D) view embeddings."""
    s = np.zeros_like(np.asarray(embeddings[0], np.float64))
    for e in embeddings:
        e = np.asarray(e, np.float64)
        s += e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return (s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)).astype(np.float32)
