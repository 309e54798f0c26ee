"""Shared fixtures: real photos from scikit-image, generated edits, a per-session TFLite cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clothing"
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["SIMSEARCH_CACHE"] = str(tmp_path_factory.mktemp("tflite-cache"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def skimage_photo(name: str) -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 8 unrelated real photos as JPEGs."""
    d = tmp_path_factory.mktemp("photos")
    for name in PHOTO_NAMES:
        Image.fromarray(skimage_photo(name)).save(d / f"{name}.jpg", quality=92)
    return d


def edited(src: Path, dst: Path, scale: float = 0.8, quality: int = 60) -> Path:
    """A resized, re-encoded copy of `src`: the kind of near duplicate users expect to be found."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        im = im.resize((int(im.width * scale), int(im.height * scale)), Image.BICUBIC)
        im.save(dst, quality=quality)
    return dst


@pytest.fixture
def clothing() -> Path:
    if not (SHARED / "images").is_dir():
        pytest.skip("../shared/data/clothing is not available")
    return SHARED
