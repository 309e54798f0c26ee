"""Camera RAW files (DNG, CR2, CR3, NEF, ARW, ORF, RW2, RAF, PEF, ...) decoded with rawpy (LibRaw).

What the model sees is the camera's own embedded preview when it is at least as large as asked (it is what the camera
showed, fast to read, and close to the JPEG a camera writes next to the RAW), else a half-size demosaic with the
camera's white balance. Either way the image is turned upright by the orientation LibRaw reads from the file.
"""

from __future__ import annotations

import io
import os
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ..errors import ImageLoadError

RAW_SUFFIXES = frozenset(
    [".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf", ".rw2", ".raf", ".pef", ".srw",
     ".3fr", ".erf", ".kdc", ".dcr", ".mos", ".mrw", ".x3f", ".iiq"]
)  # fmt: skip
_TIFF = (b"II*\x00", b"MM\x00*")
# LibRaw's `flip` (the file's orientation) as the Pillow transpose that makes the image upright
_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


def sniff_raw(head: bytes, name: str | os.PathLike | None = None) -> bool:
    """Whether a file is camera RAW: by a signature of its own (CR2, CR3, RAF, ORF, RW2), or, for the many RAW
    formats that are plain TIFF containers (DNG, NEF, ARW, PEF, ...), a TIFF header under a RAW file name."""
    if head.startswith(b"FUJIFILMCCD-RAW") or head[:4] in (b"IIRO", b"IIRS", b"MMOR", b"IIU\x00"):
        return True
    if head[4:8] == b"ftyp" and head[8:12] == b"crx ":
        return True
    if head[:4] in _TIFF:
        if head[8:11] == b"CR\x02":
            return True
        return name is not None and os.path.splitext(os.fspath(name))[1].lower() in RAW_SUFFIXES
    return False


def open_raw(
    source: str | os.PathLike | bytes | BinaryIO, target: int | None, max_pixels: int, path: str | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """An upright RGB image of a RAW file and the (width, height) of the developed photo.

    `target`: the preview is used when both its sides cover it (None: always develop). Corrupt, truncated or
    unsupported files raise ImageLoadError with the reason.
    """
    try:
        import rawpy
    except ImportError:  # pragma: no cover - rawpy is a dependency
        raise ImageLoadError("camera RAW file: install rawpy to read it", path) from None
    fp: Any = source
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        fp = os.fspath(source)
    try:
        with rawpy.imread(fp) as raw:
            s = raw.sizes
            size = (s.height, s.width) if s.flip in (5, 6) else (s.width, s.height)
            if size[0] * size[1] > max_pixels:
                raise ImageLoadError(f"image too large ({size[0] * size[1]} pixels > {max_pixels} limit)", path)
            im = _preview(raw, target, s.flip) if target is not None else None
            if im is None:
                rgb = raw.postprocess(half_size=True, use_camera_wb=True, no_auto_bright=True, output_bps=8)
                im = Image.fromarray(np.ascontiguousarray(rgb), "RGB")  # LibRaw turned it upright already
    except ImageLoadError:
        raise
    except rawpy.LibRawFileUnsupportedError:
        raise ImageLoadError("unsupported camera RAW file", path) from None
    except (rawpy.LibRawError, OSError, ValueError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise ImageLoadError(f"corrupt or truncated camera RAW file ({text})", path) from None
    im.info = {}
    return im, size


def _preview(raw: Any, target: int, flip: int) -> Image.Image | None:
    """The embedded preview, upright, when both its sides are at least `target`; None when there is none."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawError, OSError):
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        try:
            im = Image.open(io.BytesIO(thumb.data), formats=["JPEG"])
            if min(im.size) < target:
                return None
            im.draft("RGB", (target, target))
            im = im.convert("RGB")
        except Exception:
            return None
    elif thumb.format == rawpy.ThumbFormat.BITMAP:
        a = np.asarray(thumb.data)
        if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < target:
            return None
        im = Image.fromarray(np.ascontiguousarray(a, np.uint8), "RGB")
    else:
        return None
    method = _FLIP.get(flip)
    return im.transpose(method) if method is not None else im
