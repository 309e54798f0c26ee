"""What fine-tuning needs beyond the head: a cut through the backbone, augmented views, cached activations.

The backbone is split at the latest point where one tensor carries everything (no skip connection crosses it)
and the upper part holds at least `UPPER_FRACTION` of the parameters: for EfficientNet-Lite0 that is the input
of the last block (the last block and the 1280-wide head conv are trained, 30% of the weights). The lower part is
run once per augmented view and its activations kept in memory as float16, so each epoch only runs the small upper
part forwards and backwards: this is what makes fine-tuning practical on 2 cores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from ..images import ImageLoadError, load_image
from ..models._keras import keras

UPPER_FRACTION = 0.25


def split_backbone(model: Any, fraction: float = UPPER_FRACTION) -> tuple[Any, Any, str]:
    """(lower, upper, cut layer name): lower(x) -> activations, upper(activations) -> pooled features."""
    k = keras()
    total = sum(int(np.prod(w.shape)) for w in model.weights)
    for layer in reversed(model.layers[1:]):
        out = layer.output
        if len(out.shape) != 4:
            continue
        try:
            upper = k.Model(out, model.output)
        except Exception:  # a skip connection crosses this point
            continue
        n = sum(int(np.prod(w.shape)) for w in upper.weights)
        if n >= fraction * total:
            return k.Model(model.input, out), upper, layer.name
    raise ValueError(f"no point to cut {model.name} for fine-tuning")


def freeze_batchnorm(model: Any) -> None:
    """BatchNorm layers keep their ImageNet statistics and scales (small batches would wreck them)."""
    k = keras()
    for layer in model.layers:
        if isinstance(layer, k.layers.BatchNormalization):
            layer.trainable = False
        elif hasattr(layer, "layers"):
            freeze_batchnorm(layer)


AUGMENTS = ("light", "viewpoint")


def _perspective(im: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """A random homography: each corner moves by up to `strength` of the side (another viewpoint), edges filled."""
    w, h = im.size
    src = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    dst = [(x + rng.uniform(-strength, strength) * w, y + rng.uniform(-strength, strength) * h) for x, y in src]
    a, b = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):  # output point (x, y) samples input point (u, v)
        a += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        b += [u, v]
    coeffs = np.linalg.solve(np.array(a, float), np.array(b, float)).tolist()
    fill = tuple(int(c) for c in np.asarray(im).reshape(-1, 3).mean(axis=0))
    return im.transform((w, h), Image.PERSPECTIVE, coeffs, Image.BILINEAR, fillcolor=fill)


def augmented_view(path: str, size: int, fit: str, rng: np.random.Generator, augment: str = "light") -> np.ndarray:
    """A random view of the image, uint8 (size, size, 3).

    `light`: a random resized crop (45-100% of the area, aspect 3/4-4/3), a flip and colour jitter (+-25%).
    `viewpoint` (another photo of the same object): a perspective warp (corners move up to 12%), a rotation up to
    +-15 degrees, a wider crop and scale range (30-100% of the area, aspect 2/3-3/2), a flip, colour jitter (+-30%)
    and, half the time, a soft glare blob.
    """
    strong = augment == "viewpoint"
    base = load_image(path, int(size * 1.25), fit)
    im0 = Image.fromarray(base)
    if strong:
        im0 = _perspective(im0, 0.12, rng)
        im0 = im0.rotate(float(rng.uniform(-15, 15)), Image.BILINEAR,
                         fillcolor=tuple(int(c) for c in base.reshape(-1, 3).mean(axis=0)))  # fmt: skip
        base = np.asarray(im0)
    h, w = base.shape[:2]
    lo, ar = (0.30, 1.5) if strong else (0.45, 4 / 3)
    for _ in range(10):
        area = rng.uniform(lo, 1.0) * h * w
        aspect = np.exp(rng.uniform(-np.log(ar), np.log(ar)))
        ch, cw = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
        if ch <= h and cw <= w:
            break
    else:
        ch, cw = h, w
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    im = Image.fromarray(base[y : y + ch, x : x + cw]).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    jitter = 0.30 if strong else 0.25
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhancer(im).enhance(float(rng.uniform(1 - jitter, 1 + jitter)))
    out = np.asarray(im, dtype=np.uint8)
    if strong and rng.random() < 0.5:
        yy, xx = np.mgrid[0:size, 0:size]
        gy, gx = rng.uniform(0.2, 0.8, 2) * size
        sigma = rng.uniform(0.08, 0.2) * size
        g = rng.uniform(0.3, 0.7) * np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * sigma**2))
        out = np.clip(out + (255.0 - out) * g[..., None], 0, 255).astype(np.uint8)
    return out


def view_activations(
    lower: Any,
    preprocess: Callable[[np.ndarray], np.ndarray],
    paths: list[str],
    size: int,
    fit: str,
    views: int,
    seed: int,
    progress: Callable[[str, int, int], None] | None = None,
    batch: int = 32,
    augment: str = "light",
    fixed: tuple[str, ...] | list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(activations (n_ok, views, h, w, c) float16, indices of readable paths); view 0 is the plain image.

    `fixed`: instead of random augmentations, these named test-time views (`models.tta`) of the plain image, made
    with the op the exported model runs; `views` must be their number.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..models._keras import tensorflow
    from ..models.tta import view_pixels

    tf = tensorflow()
    fn = tf.function(lower, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**31, size=(len(paths), views))

    def load(i: int) -> list[np.ndarray] | None:
        try:
            plain = load_image(paths[i], size, fit)
            if fixed is not None:
                return [view_pixels(plain[None], v)[0] for v in fixed]
            r = [np.random.default_rng(int(s)) for s in seeds[i, 1:]]
            return [plain] + [augmented_view(paths[i], size, fit, g, augment) for g in r]
        except ImageLoadError:
            return None

    out: list[np.ndarray] = []
    ok: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(paths), batch):
            idx = list(range(start, min(len(paths), start + batch)))
            loaded = list(pool.map(load, idx))
            good = [(i, v) for i, v in zip(idx, loaded, strict=True) if v is not None]
            if good:
                x = np.stack([img for _, v in good for img in v])
                act = np.asarray(fn(np.ascontiguousarray(preprocess(x), np.float32)))
                out.append(act.reshape(len(good), views, *act.shape[1:]).astype(np.float16))
                ok += [i for i, _ in good]
            if progress:
                progress("views", min(len(paths), start + batch), len(paths))
    if not out:
        return np.zeros((0, views, 1, 1, 1), np.float16), np.zeros(0, np.int64)
    return np.concatenate(out), np.asarray(ok, np.int64)
