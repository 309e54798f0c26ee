"""Videos (MP4, MOV, M4V, MKV, WebM, AVI) as a few sampled frames, decoded with PyAV (FFmpeg inside the wheel).

The sampling policy, and why:
- Keyframes first. Decoding only keyframes costs a small share of a full decode, and encoders put keyframes at scene
  cuts (x264's scenecut, and the 1-2 s GOP of phone encoders), so for most videos they are already "a frame at every
  scene change and at least every couple of seconds".
- When keyframes are further apart than `every` x 1.5 (screen recordings, long-GOP exports), the video is decoded once
  from start to end instead and frames are taken on a grid of `every` seconds, plus at cuts (a jump in a 16x9 grey
  thumbnail between consecutive frames).
- Keyframes closer than `every` / 2 are thinned. A video keeps at most `max_frames` frames: a long one is sampled
  every duration / `max_frames` seconds instead, and only kept frames are ever converted to pictures, so a 2-hour
  film costs a bounded number of embeddings and a bounded amount of memory.
FFmpeg decodes with frame and slice threads on every core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ..errors import ImageLoadError

EVERY_S = 2.0
MAX_FRAMES = 240
CUT_DIFF = 28.0  # mean absolute difference (0-255) of 16x9 grey thumbnails that counts as a cut
VIDEO_SUFFIXES = frozenset([".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp", ".mts", ".m2ts"])
# ISO-BMFF brands of video files (images in the same container: heic, avif, crx, are not among them)
_VIDEO_BRANDS = {b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"mp71", b"avc1", b"qt  ",
                 b"M4V ", b"M4VH", b"M4VP", b"3gp4", b"3gp5", b"3gp6", b"3g2a", b"dash", b"MSNV", b"f4v ", b"XAVC",
                 b"mmp4"}  # fmt: skip


@dataclass
class VideoInfo:
    """What the index keeps about a video file."""

    width: int
    height: int
    duration_s: float
    bit_rate: int | None
    codec: str


def sniff_video(head: bytes) -> bool:
    """Whether the leading bytes are a video container: ISO-BMFF with a video brand, Matroska/WebM, AVI, MPEG-TS."""
    if head[4:8] == b"ftyp":
        end = min(len(head), max(16, int.from_bytes(head[0:4], "big")))
        brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}
        return head[8:12] in _VIDEO_BRANDS or (bool(brands & _VIDEO_BRANDS) and head[8:12] not in _IMAGE_BRANDS)
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return True
    return len(head) >= 189 and head[0] == 0x47 and head[188] == 0x47  # MPEG transport stream sync bytes


_IMAGE_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis", b"crx "}


def probe(path: str | os.PathLike) -> VideoInfo:
    """Size, duration, bit rate and codec of a video's first video stream."""
    with _open(path) as c:
        vs = _stream(c, path)
        return _info(c, vs)


def sample_frames(
    path: Source, every: float = EVERY_S, max_frames: int = MAX_FRAMES, size: int | None = 256
) -> tuple[VideoInfo, list[tuple[float, Image.Image]]]:
    """The video's info and its sampled frames as (seconds, RGB image), in time order (see the module docstring).

    `size`: frames are scaled by FFmpeg so their shorter side is about `size` (None: full size). A corrupt, truncated
    or frameless video raises ImageLoadError with the reason; frames decoded before a late error are kept.
    """
    if every <= 0 or max_frames < 1:
        raise ValueError("every must be positive and max_frames at least 1")
    with _open(path) as c:
        vs = _stream(c, path)
        info = _info(c, vs)
        every = max(every, info.duration_s / max_frames)  # a long video is sampled sparser, never more frames
        keys, times = _decode(c, vs, path, keyframes_only=True, size=size, every=every, max_frames=max_frames)
        gaps = np.diff([0.0, *times, info.duration_s]) if times else [info.duration_s]
        if times and max(gaps) <= every * 1.5:
            picked = keys
        else:
            try:
                c.seek(0)
                picked, _ = _decode(c, vs, path, keyframes_only=False, size=size, every=every, max_frames=max_frames)
            except ImageLoadError:
                raise
            except Exception:  # cannot seek back (a damaged index, a stream): keep the keyframes
                picked = keys
    if not picked:
        raise ImageLoadError("no decodable video frame", _name(path))
    if len(picked) > max_frames:
        idx = np.unique(np.round(np.linspace(0, len(picked) - 1, max_frames)).astype(int))
        picked = [picked[i] for i in idx]
    return info, [(t, im) for t, im, _ in picked]


Source = str | os.PathLike | BinaryIO


def _name(source: Source) -> str | None:
    if not hasattr(source, "read"):
        return os.fspath(source)  # type: ignore[arg-type]
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else None


def _open(source: Source) -> Any:
    """A container from a path or an open binary file (the server decodes the descriptor it checked)."""
    import av

    try:
        return av.open(source if hasattr(source, "read") else os.fspath(source), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ImageLoadError(f"cannot open video ({_why(e)})", _name(source)) from None


def _stream(c: Any, path: Source) -> Any:
    if not c.streams.video:
        raise ImageLoadError("no video stream", _name(path))
    vs = c.streams.video[0]
    vs.thread_type = "AUTO"  # frame and slice threads: both cores
    return vs


def _info(c: Any, vs: Any) -> VideoInfo:
    if vs.duration is not None and vs.time_base is not None:
        duration = float(vs.duration * vs.time_base)
    elif c.duration is not None:
        duration = c.duration / 1_000_000
    else:
        duration = 0.0
    cc = vs.codec_context
    return VideoInfo(int(cc.width or 0), int(cc.height or 0), duration, vs.bit_rate or c.bit_rate, cc.name)


def _decode(
    c: Any, vs: Any, path: Source, keyframes_only: bool, size: int | None, every: float, max_frames: int
) -> tuple[list[tuple[float, Image.Image, bool]], list[float]]:
    """The kept (time, image, is_cut) samples, and the times of every decoded keyframe (keyframe pass).

    Keyframes are kept at least `every` / 2 apart; a full decode keeps the frames on a grid of `every` seconds plus
    cuts. Only kept frames become images, and when more than twice `max_frames` are held every other one is dropped
    and the spacing doubled, so memory stays bounded whatever the length or the metadata say."""
    import av

    vs.codec_context.skip_frame = "NONKEY" if keyframes_only else "DEFAULT"
    out: list[tuple[float, Image.Image, bool]] = []
    times: list[float] = []
    prev: np.ndarray | None = None
    next_t = 0.0
    spacing = every / 2 if keyframes_only else every
    try:
        for frame in c.decode(vs):
            t = float(frame.time) if frame.time is not None else (times[-1] if times else 0.0)
            times.append(t)
            cut = False
            if not keyframes_only:  # keyframes are too far apart for a difference to mean a cut
                tiny = _tiny_luma(frame)
                cut = prev is not None and float(np.abs(tiny - prev).mean()) > CUT_DIFF
                prev = tiny
            if cut or t >= next_t - 1e-6:
                out.append((t, _image(frame, size), cut))
                next_t = (np.floor(t / spacing + 1e-6) + 1) * spacing  # the next grid point: no drift
                if len(out) > 2 * max_frames:
                    out, spacing = out[::2], spacing * 2
    except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError) as e:
        if not out:
            raise ImageLoadError(f"corrupt or truncated video ({_why(e)})", _name(path)) from None
    return out, times


def _tiny_luma(frame: Any) -> np.ndarray:
    """About 16x9 samples of the frame's brightness, read straight off the luma plane (scaling each frame with
    swscale cost 3 ms at 720p, five times the decode)."""
    name = frame.format.name
    if name.startswith(("yuv", "nv12", "nv21", "gray")) and not name.endswith(("le", "be")):  # 8 bits a sample
        p = frame.planes[0]
        y = np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width]
        return y[:: max(1, p.height // 9), :: max(1, p.width // 16)][:9, :16].astype(np.float32)
    return frame.to_ndarray(width=16, height=9, format="gray").astype(np.float32)


def _image(frame: Any, size: int | None) -> Image.Image:
    w, h = frame.width, frame.height
    if size is not None and min(w, h) > size:
        s = size / min(w, h)
        w, h = max(2, round(w * s)), max(2, round(h * s))
    return Image.fromarray(frame.to_ndarray(width=w, height=h, format="rgb24"), "RGB")


def _why(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def poster(source: Source, size: int | None = None) -> Image.Image:
    """The video's first decodable keyframe: its picture in thumbnails, reports and the web page."""
    return frame_at(source, None, size)


def frame_at(source: Source, t: float | None, size: int | None = None) -> Image.Image:
    """The frame shown at `t` seconds (the first frame at or after it; past the end, the last one), or with `t`
    None the first keyframe. Seeks to the keyframe before `t` and decodes forward from there only."""
    import av

    with _open(source) as c:
        vs = _stream(c, source)
        last = None
        try:
            if t is None:
                vs.codec_context.skip_frame = "NONKEY"
            elif t > 0 and vs.time_base:
                c.seek(int(t / vs.time_base), stream=vs, backward=True, any_frame=False)
            for frame in c.decode(vs):
                last = frame
                if t is None or frame.time is None or frame.time >= t - 1e-3:
                    return _image(frame, size)
        except (av.FFmpegError, OSError, ValueError, EOFError) as e:
            if last is None:
                raise ImageLoadError(f"corrupt or truncated video ({_why(e)})", _name(source)) from None
        if last is not None:
            return _image(last, size)
    raise ImageLoadError("no decodable video frame", _name(source))
