"""Frozen-backbone features of a labelled set, computed once on the fast embedding path and cached on disk.

The cache key covers the backbone signature, the fit and every file's path, size and mtime, so a retrain with
other head settings reuses the features and any change to a file recomputes them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..models.tflite_exec import default_cache_dir

ProgressFn = Callable[[str, int, int], None]


def features_cache_dir() -> Path:
    env = os.environ.get("SIMSEARCH_CACHE")
    return (Path(env).expanduser() if env else default_cache_dir().parent) / "features"


def _key(signature: dict, fit: str, paths: list[str]) -> str:
    h = hashlib.sha256(repr(sorted(signature.items())).encode() + fit.encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:32]


def extract_features(
    embedder: object, paths: list[str], progress: ProgressFn | None = None
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(features (n_ok, d) float32, indices of the readable paths, [(path, error)]) for `paths`, cached."""
    sig = embedder.signature()  # type: ignore[attr-defined]
    cache = features_cache_dir() / f"{_key(sig, sig.get('fit', ''), paths)}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                errs = [(paths[int(i)], str(e)) for i, e in zip(z["err_idx"], z["err_msg"], strict=True)]
                if progress:
                    progress("features", len(paths), len(paths))
                return z["vectors"].astype(np.float32), z["ok"].astype(np.int64), errs
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    position = {p: i for i, p in enumerate(paths)}
    vecs, ok, errors = [], [], []
    done = 0
    for batch in embedder.embed_files(paths):  # type: ignore[attr-defined]
        for rec in batch:
            i = position[rec.path]
            if rec.vector is not None:
                vecs.append(rec.vector)
                ok.append(i)
            else:
                errors.append((i, rec.error or "unreadable"))
        done += len(batch)
        if progress:
            progress("features", done, len(paths))
    order = np.argsort(ok, kind="stable")
    v = np.stack(vecs)[order].astype(np.float32) if vecs else np.zeros((0, embedder.dim), np.float32)  # type: ignore[attr-defined]
    ok_arr = np.asarray(ok, np.int64)[order]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, vectors=v, ok=ok_arr, err_idx=np.array([i for i, _ in errors], np.int64),
             err_msg=np.array([m for _, m in errors], dtype=str))  # fmt: skip
    os.replace(tmp, cache)
    return v, ok_arr, [(paths[i], m) for i, m in errors]


def augmented_features(
    embedder: object,
    paths: list[str],
    views: int,
    augment: str,
    seed: int,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """(len(paths), views, d) frozen features of `views` augmented views of each image (`finetune.augmented_view`),
    on the same fast path as the plain features and cached on disk the same way; an unreadable file gets zeros.

    What `head` mode learns invariance from: each epoch draws, per image, its plain feature or one of these.
    """
    from ..images import ImageLoadError
    from .finetune import augmented_view

    sig = embedder.signature()  # type: ignore[attr-defined]
    tag = f"{sig.get('fit', '')}|{augment}|{views}|{seed}"
    cache = features_cache_dir() / f"views-{_key(sig, tag, paths)}.npy"
    size, fit = embedder.backbone.input_size, embedder.fit  # type: ignore[attr-defined]
    seeds = np.random.default_rng(seed).integers(0, 2**31, size=(len(paths), views))

    def load(i: int) -> list[np.ndarray] | None:
        try:
            return [augmented_view(paths[i], size, fit, np.random.default_rng(int(s)), augment) for s in seeds[i]]
        except ImageLoadError:
            return None

    def fill(out: np.ndarray) -> None:
        for rows, got in _loaded_batches(len(paths), load, progress, "views"):
            vecs = embedder.embed_pixels(np.stack([img for v in got for img in v]))  # type: ignore[attr-defined]
            out[rows] = vecs.reshape(len(rows), views, -1)

    return _cached_views(cache, (len(paths), views, embedder.dim), fill, np.float16)  # type: ignore[attr-defined]


def tta_features(
    embedder: object, paths: list[str], views: tuple[str, ...] | list[str], progress: ProgressFn | None = None
) -> np.ndarray:
    """(len(paths), len(views), d) frozen features of fixed test-time views of each image (`models.tta`), cached.

    Each image is loaded at the model's input size and fit as for its plain feature, then each view is made with
    the op the exported model's TTA layer runs (`tta.view_pixels`), so a held-out figure computed from these
    features is what the exported model computes. An unreadable file gets zeros.
    """
    from ..images import ImageLoadError, load_image
    from ..models.tta import CROP, view_pixels

    views = list(views)
    sig = embedder.signature()  # type: ignore[attr-defined]
    size, fit = embedder.backbone.input_size, embedder.fit  # type: ignore[attr-defined]
    tag = f"{fit}|{','.join(views)}|crop{CROP}"  # the views' own parameters: a change recomputes them
    cache = features_cache_dir() / f"tta-{_key(sig, tag, paths)}.npy"

    def load(i: int) -> np.ndarray | None:
        try:
            return load_image(paths[i], size, fit)
        except ImageLoadError:
            return None

    def fill(out: np.ndarray) -> None:
        for rows, got in _loaded_batches(len(paths), load, progress, "tta"):
            x = np.stack(got)
            for j, v in enumerate(views):
                out[rows, j] = embedder.embed_pixels(view_pixels(x, v))  # type: ignore[attr-defined]

    return _cached_views(cache, (len(paths), len(views), embedder.dim), fill, np.float32)  # type: ignore[attr-defined]


def _loaded_batches(
    n: int, load: Callable[[int], object | None], progress: ProgressFn | None, stage: str, step: int = 32
) -> Iterator[tuple[list[int], list]]:
    """(rows, loaded items) per batch of `step` of items 0..n-1 loaded on two threads; items `load` gives None for
    (unreadable) are left out; `progress(stage, done, n)` after each batch."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        for start in range(0, n, step):
            idx = list(range(start, min(n, start + step)))
            good = [(i, x) for i, x in zip(idx, pool.map(load, idx), strict=True) if x is not None]
            if good:
                yield [i for i, _ in good], [x for _, x in good]
            if progress:
                progress(stage, idx[-1] + 1, n)


def _cached_views(
    cache: Path, shape: tuple[int, int, int], fill: Callable[[np.ndarray], None], stored: type
) -> np.ndarray:
    """A (n, views, d) float32 feature array: read from `cache` when it holds that many images and views, else a
    zero array filled by `fill`, written to `cache` atomically as `stored` (the values returned are the stored
    ones)."""
    if cache.is_file():
        try:
            out = np.load(cache, allow_pickle=False)
            if out.shape[:2] == shape[:2]:
                return out.astype(np.float32)
        except (OSError, ValueError):
            pass
    out = np.zeros(shape, np.float32)
    fill(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    out = out.astype(stored)
    np.save(tmp, out)
    os.replace(tmp, cache)
    return out.astype(np.float32)
