"""Small camera RAW files that LibRaw really decodes: a Bayer mosaic (RGGB, 12 bit) in a DNG written with tifffile."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# XYZ -> linear sRGB, so that the "camera" colour space is linear sRGB and the developed image matches the input
_XYZ_TO_SRGB = ((3.2406, -1.5372, -0.4986), (-0.9689, 1.8758, 0.0415), (0.0557, -0.2040, 1.0570))


def write_dng(rgb: np.ndarray, path: Path, orientation: int = 1, preview: np.ndarray | None = None) -> Path:
    """Write `rgb` (HxWx3 uint8, sRGB) as a DNG mosaic; `preview` goes in IFD0 as the embedded preview, the mosaic
    then in a SubIFD (as cameras write them); `orientation` is the TIFF/EXIF orientation tag."""
    import tifffile

    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    lin = np.round((rgb[:h, :w] / 255.0) ** 2.2 * 4095).astype(np.uint16)
    cfa = np.empty((h, w), np.uint16)
    cfa[0::2, 0::2], cfa[0::2, 1::2] = lin[0::2, 0::2, 0], lin[0::2, 1::2, 1]
    cfa[1::2, 0::2], cfa[1::2, 1::2] = lin[1::2, 0::2, 1], lin[1::2, 1::2, 2]
    matrix = tuple(v for row in _XYZ_TO_SRGB for x in row for v in (round(x * 10000), 10000))
    dng = [(50706, "B", 4, (1, 4, 0, 0)), (50707, "B", 4, (1, 1, 0, 0)), (50708, "s", 0, "simsearch test camera"),
           (50721, "2i", 9, matrix), (50728, "2I", 3, (1, 1, 1, 1, 1, 1)), (50778, "H", 1, 21),
           (274, "H", 1, orientation)]  # fmt: skip
    mosaic = [(33421, "H", 2, (2, 2)), (33422, "B", 4, (0, 1, 1, 2)), (50714, "H", 1, 0), (50717, "H", 1, 4095)]
    with tifffile.TiffWriter(path) as tw:
        if preview is None:
            tw.write(cfa, photometric=32803, subfiletype=0, extratags=dng + mosaic, metadata=None)
        else:
            tw.write(np.ascontiguousarray(preview), photometric="rgb", subfiletype=1, subifds=1, extratags=dng,
                     metadata=None)  # fmt: skip
            tw.write(cfa, photometric=32803, subfiletype=0, extratags=mosaic, metadata=None)
    return path
