"""Local features of one image: SIFT keypoints with RootSIFT descriptors, small enough to store per image.

An image is decoded upright (EXIF applied), turned grey and scaled so its longer side is `max_side` pixels; SIFT
keeps the `max_features` strongest keypoints. Descriptors are RootSIFT (L1-normalised, square-rooted, so a dot
product is the Hellinger kernel) quantised to uint8; keypoint positions are stored as float16 fractions of the
image's width and height, so features are independent of the working size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BadInputError

MAX_SIDE = 512
MAX_FEATURES = 512
DESC_DIM = 128
_HEADER = struct.Struct("<4sHHI")  # magic, width, height, keypoints
_MAGIC = b"RSF1"


def require_cv2() -> Any:
    """OpenCV, or a one-line error saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise BadInputError(
            "local features need OpenCV, a dependency of simsearch: pip install opencv-python-headless"
        ) from None
    return cv2


@dataclass
class LocalFeatures:
    """Keypoints of one image: `xy` (n, 2) in [0, 1] image fractions, `desc` (n, 128) uint8 RootSIFT."""

    width: int
    height: int
    xy: np.ndarray
    desc: np.ndarray
    _unit: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.xy)

    def points(self, side: int = MAX_SIDE) -> np.ndarray:
        """Keypoint positions in pixels of the image scaled to `side` on its longer edge (float32)."""
        s = side / max(self.width, self.height)
        return (self.xy.astype(np.float32) * np.array([self.width * s, self.height * s], np.float32)).astype(np.float32)

    def unit_descriptors(self) -> np.ndarray:
        """Descriptors as float32 rows of unit L2 norm (the quantisation step undone up to scale); made once."""
        if self._unit is None:
            d = self.desc.astype(np.float32)
            d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
            self._unit = d
        return self._unit

    def to_bytes(self) -> bytes:
        xy = np.ascontiguousarray(self.xy, dtype=np.float16)
        desc = np.ascontiguousarray(self.desc, dtype=np.uint8)
        return _HEADER.pack(_MAGIC, self.width, self.height, len(xy)) + xy.tobytes() + desc.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalFeatures:
        magic, w, h, n = _HEADER.unpack_from(data)
        if magic != _MAGIC or len(data) != _HEADER.size + n * (4 + DESC_DIM):
            raise ValueError("damaged local-features record")
        off = _HEADER.size
        xy = np.frombuffer(data, np.float16, 2 * n, off).reshape(n, 2)
        desc = np.frombuffer(data, np.uint8, n * DESC_DIM, off + 4 * n).reshape(n, DESC_DIM)
        return cls(w, h, xy, desc)


def grey_image(source: Any, max_side: int = MAX_SIDE) -> np.ndarray:
    """`source` (path, bytes, PIL image or array) as a uint8 grey array whose longer side is `max_side`."""
    from ..images import open_image

    return _grey(open_image(source, target=max_side), max_side)


def _grey(rgb: Any, max_side: int) -> np.ndarray:
    """An upright RGB image as grey, its longer side scaled down to `max_side` (the RGB image is not copied)."""
    im = rgb.convert("L")
    w, h = im.size
    s = max_side / max(w, h)
    if s < 1:
        from PIL import Image

        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(im, dtype=np.uint8)


def extract(source: Any, max_features: int = MAX_FEATURES, max_side: int = MAX_SIDE) -> LocalFeatures:
    """SIFT keypoints and RootSIFT descriptors of an image; raises ImageLoadError for unreadable files."""
    from ..images import decoded

    cv2 = require_cv2()
    with decoded(source, target=max_side) as im:  # counts against the decode budget, SIFT's scale space too
        width, height = im.size
        grey = _grey(im, max_side)
        im.close()
        sift = cv2.SIFT_create(nfeatures=max_features)
        kps, desc = sift.detectAndCompute(grey, None)
    if desc is None or not kps:
        return LocalFeatures(width, height, np.zeros((0, 2), np.float16), np.zeros((0, DESC_DIM), np.uint8))
    kps, desc = kps[:max_features], desc[:max_features]
    gh, gw = grey.shape
    xy = np.array([k.pt for k in kps], np.float32) / np.array([gw, gh], np.float32)
    root = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-6))  # RootSIFT: unit L2 norm
    q = np.clip(np.rint(root * 255.0), 0, 255).astype(np.uint8)
    return LocalFeatures(width, height, np.clip(xy, 0, 1).astype(np.float16), q)
