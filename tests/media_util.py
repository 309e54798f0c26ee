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


def write_clip(
    path: Path,
    pictures: list[np.ndarray],
    seconds: float,
    fps: int = 25,
    size: tuple[int, int] = (320, 240),
    gop: int | None = None,
    codec: str = "libx264",
    zoom: float = 0.0,
) -> Path:
    """A clip that pans (and zooms by `zoom` over each shot) across `pictures` in turn, one shot each, cutting from
    one to the next: the kind of video a phone or an editor makes, small enough for tests."""
    from fractions import Fraction

    import av
    from PIL import Image

    w, h = size
    n = int(seconds * fps)
    per = max(1, n // len(pictures))
    shots = [Image.fromarray(p).convert("RGB").resize((w * 2, h * 2)) for p in pictures]
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if gop:
            s.options = {"g": str(gop)}
        for i in range(n):
            shot, k = shots[min(i // per, len(shots) - 1)], (i % per) / per
            z = 1.0 - zoom * k
            cw, ch = w * 2 * z * 0.6, h * 2 * z * 0.6
            x0, y0 = (w * 2 - cw) * (0.3 + 0.4 * k), (h * 2 - ch) / 2  # a steady pan over part of the picture
            frame = np.asarray(shot.resize((w, h), box=(x0, y0, x0 + cw, y0 + ch)))
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, fps)
            for p in s.encode(vf):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def reencode(
    src: Path,
    dst: Path,
    scale: float = 1.0,
    start: float = 0.0,
    end: float | None = None,
    gop: int | None = None,
    codec: str = "libx264",
    fps: int = 25,
) -> Path:
    """A copy of a clip: re-encoded (other GOP, codec or container by `dst`'s suffix), resized, or trimmed."""
    from fractions import Fraction

    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        s = out.add_stream(codec, rate=fps)
        s.width = int(vin.codec_context.width * scale) // 2 * 2
        s.height = int(vin.codec_context.height * scale) // 2 * 2
        s.pix_fmt = "yuv420p"
        if codec != "libx264":
            s.bit_rate = 600_000  # the codec's default (about 100 kb/s) is far below any real copy
        if gop:
            s.options = {"g": str(gop)}
        i = 0
        for f in inp.decode(vin):
            if f.time < start or (end is not None and f.time >= end):
                continue
            g = f.reformat(width=s.width, height=s.height, format="yuv420p")
            g.pts, g.time_base = i, Fraction(1, fps)
            i += 1
            for p in s.encode(g):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return dst
