"""Copies vs other shots: is a related pair the same capture (a copy) or another photo of the same scene (similar)?

A copy is the same pixels, whatever was done to them (re-encoded, resized, cropped, rotated, brightened, captioned,
converted): once the two images are aligned by an affine map, every textured cell of a grid agrees (normalised
cross-correlation, so gain and offset edits pass) and agrees *in place* (the residual shift of each cell, a
Lucas-Kanade step, stays under a fraction of a pixel). Another shot of the scene (a burst, the same poster from
another phone) moves: parallax and perspective leave cells shifted after the best affine fit, a moving subject or
other light leaves cells that disagree. Cameras make the same call from EXIF when both files have it: a copy keeps
or strips the capture time and camera, it never changes them, so different ones mean different shots.

Everything works on small grey thumbnails (longer side `SIDE`), decoded once per file (JPEG DCT-scaled) and cached
by the caller; the alignment is an ECC affine fit at half that size, tried first as the identity (same framing, the
common case) and started from a homography when local features found one (`init`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ImageLoadError
from ..sources import is_url

SIDE = 256  # longer side of the thumbnails compared
BLUR = 1.0  # Gaussian sigma (pixels at SIDE) applied before comparing
GRID = 8  # cells per side
FLAT_STD, STRONG_STD = 4.0, 16.0  # grey-level spread of a flat cell / of texture that a flat cell contradicts
CLIPPED = (4.0, 251.0)
CELL_NCC = 0.8  # a cell agrees at or above this correlation (copies: every textured cell at 256 px)
MAX_WEAK = 0.06  # copies: at most this share of cells disagree (a caption, a logo)
MAX_WEAK_IN_PLACE = 0.10  # up to this many when everything else sits exactly in place (an overlay, not motion)
TIGHT_SHIFT_P90 = 0.35
MAX_BEND = 0.55  # copies: quadratic bend of the shift field at the corners (px at SIDE); perspective bends it
MIN_GRADIENT = 1.5  # grey levels per pixel (RMS, weakest direction) a cell needs for its shift to be measured
MOVED_PX = 0.75  # a cell whose residual shift is this large (pixels at SIDE) has moved: parallax, motion
MAX_MOVED = 0.15  # copies: at most this share of cells moved
MAX_SHIFT_P90 = 0.8  # copies: 90th percentile of the residual shifts
MIN_CELLS = 8  # fewer comparable cells: the pixels give no verdict
SIMILAR_NCC = 0.80  # not a copy, but the aligned images still correlate this well overall: the same scene
TIERS = ("copy", "similar", "none")


@dataclass
class Thumb:
    """What the tier decision needs of one file: a small grey image, capture facts from EXIF, shot quality."""

    grey: np.ndarray | None  # float16 (half the memory of float32), longer side SIDE; None once released
    captured: str | None = None  # DateTimeOriginal + SubSecTimeOriginal
    camera: str | None = None  # Make Model (BodySerialNumber)
    sharpness: float = 0.0  # variance of the Laplacian of the grey thumbnail
    exposure: float = 0.0  # share of clipped (blown or crushed) pixels
    pixels: int = 0  # width x height of the file


@dataclass
class Evidence:
    """How two aligned thumbnails compare; `tier` is the verdict ("copy", "similar", "none") and `why` says why."""

    tier: str
    why: str
    cells: int = 0
    weak: float = 1.0  # share of cells that disagree
    moved: float = 1.0  # share of cells shifted by MOVED_PX or more
    shift_p90: float = math.inf  # 90th percentile residual shift (pixels at SIDE)
    ncc: float = -1.0  # overall correlation after alignment
    rotation: int = 0  # quarter turns applied to the second image
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "why": self.why, "cells": self.cells, "weak": round(self.weak, 3),
                "moved": round(self.moved, 3),
                "shift_p90": None if not math.isfinite(self.shift_p90) else round(self.shift_p90, 3),
                "ncc": round(self.ncc, 3), "rotation": self.rotation * 90,
                **{k: round(v, 3) for k, v in self.metrics.items()}}  # fmt: skip


def load_thumb(path: str) -> Thumb:
    """Decode `path` once into a Thumb (raises ImageLoadError when unreadable). JPEGs decode straight to grey at
    the smallest DCT scale that still covers the thumbnail; other formats go through `images.open_image`."""
    import cv2
    from PIL import Image

    source: Any = path
    if is_url(path):  # an object in object storage: fetched once, then decoded like a file
        from ..sources.remote import read_object

        try:
            source = io.BytesIO(read_object(path)[0])
        except Exception as e:
            raise ImageLoadError(f"cannot read: {' '.join(str(e).split())}", path) from None
    g, captured, camera, pixels = _jpeg_grey(source)
    if g is None:
        from ..images import open_image

        g = open_image(source.getvalue() if isinstance(source, io.BytesIO) else path, target=SIDE).convert("L")
    w, h = g.size
    s = SIDE / max(w, h)
    if s < 1:
        g = g.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR, reducing_gap=2.0)
    sharp = _quality(np.asarray(g, np.uint8))
    grey = np.asarray(g, np.float32)
    # a light blur: resampling and re-encoding alias fine texture differently in each copy; the alignment is kept
    grey = cv2.GaussianBlur(grey, (0, 0), BLUR).astype(np.float16)
    return Thumb(grey, captured, camera, *sharp, pixels=pixels or w * h)


def _jpeg_grey(path: Any) -> tuple[Any, str | None, str | None, int]:
    """(upright grey image, or None when not a plain JPEG; capture time; camera; stored pixels) from one open."""
    from PIL import Image

    from ..images import DRAFT_COVERAGE

    try:
        with Image.open(path) as im:
            pixels = im.size[0] * im.size[1]
            captured, camera = _exif_tags(im)
            if im.format != "JPEG" or im.mode not in ("L", "RGB"):
                return None, captured, camera, pixels
            w, h = im.size
            s = DRAFT_COVERAGE * SIDE / max(w, h)
            if s < 1:
                im.draft("L", (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
            turn = _ORIENT.get(im.getexif().get(274) or 1)
            g = im.convert("L")
            return (g.transpose(turn) if turn is not None else g), captured, camera, pixels
    except Exception:
        return None, None, None, 0


_ORIENT = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # EXIF orientation -> PIL.Image.Transpose value


def _exif_tags(im: Any) -> tuple[str | None, str | None]:
    """(capture time, camera) from an opened image's EXIF; Nones when it has no such tags."""
    try:
        exif = im.getexif()
        sub = exif.get_ifd(0x8769)
    except Exception:
        return None, None
    when = sub.get(36867)  # DateTimeOriginal: DateTime (306) is the last edit, which a copy may change
    if when:
        when = str(when).strip() + ("." + str(sub.get(37521)).strip() if sub.get(37521) else "")
    parts = [str(exif.get(271) or "").strip(), str(exif.get(272) or "").strip(), str(sub.get(42033) or "").strip()]
    return when or None, " ".join(p for p in parts if p) or None


def shot_quality(t: Thumb) -> Thumb:
    """Fill in `t`'s sharpness and exposure (only similar groups need them)."""
    if t.sharpness == 0.0 and t.exposure == 0.0 and t.grey is not None:
        t.sharpness, t.exposure = _quality(np.clip(t.grey, 0, 255).astype(np.uint8))
    return t


def _quality(g: np.ndarray) -> tuple[float, float]:
    """Sharpness (variance of the Laplacian) and the share of clipped pixels of a uint8 grey thumbnail."""
    import cv2

    _, std = cv2.meanStdDev(cv2.Laplacian(g, cv2.CV_16S))
    kept = cv2.countNonZero(cv2.inRange(g, int(CLIPPED[0]) + 1, int(CLIPPED[1]) - 1))
    return float(std[0, 0]) ** 2, 1.0 - kept / g.size


def shot_score(t: Thumb) -> float:
    """Best shot first (higher is better): sharp, well exposed, then larger."""
    shot_quality(t)
    return math.log1p(t.sharpness) - 4.0 * t.exposure + 0.05 * math.log1p(t.pixels)


def exif_verdict(a: Thumb, b: Thumb) -> str | None:
    """Why EXIF proves two files are different shots, or None (no proof: same or missing tags)."""
    if a.captured and b.captured and a.captured != b.captured:
        return f"different capture times in EXIF ({a.captured} vs {b.captured})"
    if a.camera and b.camera and a.camera != b.camera:
        return f"different cameras in EXIF ({a.camera} vs {b.camera})"
    return None


def compare(a: Thumb, b: Thumb, init: np.ndarray | None = None, rotations: bool = False) -> Evidence:
    """The tier of a pair from its pixels and EXIF. `init`: a 3x3 map from b's thumbnail pixels to a's (e.g. a
    homography from local features); `rotations`: also try b turned by 90/180/270 degrees."""
    other = exif_verdict(a, b)
    ga, gb = a.grey.astype(np.float32), b.grey.astype(np.float32)
    ev = _pixels(ga, gb, init, rotations)
    if ev.tier == "copy" and not _clear(ev):  # near a limit: a copy is one both ways (the fits are not symmetric)
        back = _pixels(gb, ga, None if init is None else np.linalg.inv(init), rotations)
        if back.tier != "copy":
            ev = back
    if other and ev.tier == "copy":
        return Evidence("similar", other, ev.cells, ev.weak, ev.moved, ev.shift_p90, ev.ncc, ev.rotation)
    if other:
        ev.why = f"{other}; {ev.why}"
    return ev


def _clear(ev: Evidence) -> bool:
    """Evidence far inside every copy limit (half of each): no need to look the other way."""
    return (ev.weak <= MAX_WEAK / 2 and ev.moved <= MAX_MOVED / 2 and ev.shift_p90 <= MAX_SHIFT_P90 / 2
            and ev.metrics.get("bend", 0.0) <= MAX_BEND / 2)  # fmt: skip


def _pixels(a: np.ndarray, b: np.ndarray, init: np.ndarray | None, rotations: bool) -> Evidence:
    import cv2

    best: Evidence | None = None
    ra = a.shape[1] / a.shape[0]
    turns = (0, 1, 3, 2) if rotations else (0, 1, 3)  # quarter turns only when asked, or when the framing says so
    if init is not None:
        turns = (0,)
    elif not rotations and abs(math.log(ra * b.shape[0] / b.shape[1])) <= 0.25:
        turns = (0,)
    for r in turns:
        br = np.ascontiguousarray(np.rot90(b, r)) if r else b
        if init is None and abs(math.log(ra / (br.shape[1] / br.shape[0]))) > 0.25:
            continue  # framing too different for an alignment from the identity
        sx, sy = br.shape[1] / a.shape[1], br.shape[0] / a.shape[0]
        bb = cv2.resize(br, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
        if init is not None:  # b pixels -> a pixels; ECC wants a -> bb
            to_bb = np.diag([1 / sx, 1 / sy, 1.0]) @ np.linalg.inv(init)
            starts = [(to_bb / to_bb[2, 2])[:2].astype(np.float32)]
        else:
            starts = [None]
        for m in starts:
            if m is None:
                ev = _judge(a, bb, None)
                if ev.tier == "copy":
                    ev.rotation = r
                    return ev
                m = _ecc(a, bb, np.eye(2, 3, dtype=np.float32))
            else:
                m = _ecc(a, bb, m)
            if m is None:
                continue
            ev = _judge(a, bb, m)
            ev.rotation = r
            if ev.tier == "copy":
                return ev
            if best is None or (ev.cells, -ev.weak - ev.moved) > (best.cells, -best.weak - best.moved) and ev.cells:
                best = ev
    return best or Evidence("none", "the images could not be aligned")


def _ecc(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> np.ndarray | None:
    """Affine map (a pixels -> b pixels) refined by ECC at half size from `m`; None when it does not converge."""
    import cv2

    ha, hb = cv2.pyrDown(a), cv2.pyrDown(b)
    m = m.copy()
    m[:, 2] /= 2
    crit = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 40, 1e-4)
    try:
        qa, qb = cv2.pyrDown(ha), cv2.pyrDown(hb)
        mq = m.copy()
        mq[:, 2] /= 2
        _, mq = cv2.findTransformECC(qa, qb, mq, cv2.MOTION_AFFINE, crit, None, 3)
        mq[:, 2] *= 2
        _, m = cv2.findTransformECC(ha, hb, mq, cv2.MOTION_AFFINE, crit, None, 3)
    except cv2.error:
        return None
    m[:, 2] *= 2
    return m


def _judge(a: np.ndarray, b: np.ndarray, m: np.ndarray | None) -> Evidence:
    """Warp b onto a with `m` (a -> b pixels; None: the identity) and compare them cell by cell."""
    import cv2

    if m is None:
        return _cells(a, b, None)
    h, w = a.shape
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(b, m, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(np.ones(b.shape, np.uint8), m, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8))
    return _cells(a, warped, mask)


def _cells(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> Evidence:
    """Per grid cell: agreement (NCC over usable pixels) and the residual shift (one Lucas-Kanade step), all from
    per-cell means of pixel products (box filters), so the cost does not depend on the grid."""
    import cv2

    h, w = a.shape
    ch, cw = h // GRID, w // GRID
    if ch < 4 or cw < 4:
        return Evidence("none", "too small to compare")
    a, b = a[: GRID * ch, : GRID * cw], b[: GRID * ch, : GRID * cw]

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.resize(x, (GRID, GRID), interpolation=cv2.INTER_AREA).ravel().astype(np.float64)

    u = ((a > CLIPPED[0]) & (a < CLIPPED[1]) & (b > CLIPPED[0]) & (b < CLIPPED[1])).astype(np.float32)
    if mask is not None:
        m = (mask[: GRID * ch, : GRID * cw] > 0).astype(np.float32)
        u *= m
        covered = box(m)
    else:
        covered = np.ones(GRID * GRID)
    n = box(u)
    live = (covered >= 0.9) & (n >= 0.7)
    if live.sum() < MIN_CELLS:
        return Evidence("none", f"too little overlap to compare ({covered.mean():.0%} covered)", int(live.sum()))
    n = np.maximum(n, 1e-6)
    au, bu = a * u, b * u
    ma, mb = box(au) / n, box(bu) / n
    va = np.maximum(box(au * a) / n - ma * ma, 0.0)
    vb = np.maximum(box(bu * b) / n - mb * mb, 0.0)
    cov = box(au * b) / n - ma * mb
    sa, sb = np.sqrt(va), np.sqrt(vb)
    ncc = cov / np.maximum(sa * sb, 1e-6)
    flat_a, flat_b = sa < FLAT_STD, sb < FLAT_STD
    both_flat = flat_a & flat_b
    contradict = (flat_a & (sb >= STRONG_STD)) | (flat_b & (sa >= STRONG_STD))
    faint = (flat_a ^ flat_b) & ~contradict  # flat against faint texture: smoothing or clipping edits look like this
    counted = live & ~faint
    cells = int(counted.sum())
    if cells < MIN_CELLS:
        return Evidence("none", "too few comparable cells", cells)
    textured = counted & ~flat_a & ~flat_b
    agree = both_flat | (textured & (ncc >= CELL_NCC))
    # residual shift of b against a per agreeing textured cell, gain and offset removed: a Lucas-Kanade step
    # it = (b - mb) * k - (a - ma) with k = sa / sb; sums of gradient x it come from box means of products
    gx = cv2.Sobel(a, cv2.CV_32F, 1, 0, ksize=1, scale=0.5) * u
    gy = cv2.Sobel(a, cv2.CV_32F, 0, 1, ksize=1, scale=0.5) * u
    k = sa / np.maximum(sb, 1e-6)
    mgx, mgy = box(gx), box(gy)
    bx = k * (box(gx * b) - mb * mgx) - (box(gx * a) - ma * mgx)
    by = k * (box(gy * b) - mb * mgy) - (box(gy * a) - ma * mgy)
    gxx, gyy, gxy = box(gx * gx), box(gy * gy), box(gx * gy)  # u is 0/1: u * u = u
    det = gxx * gyy - gxy * gxy
    # shifts only where nothing is clipped: a brightness edit's clipping edges pull the gradients
    # and only where the gradients pin the position down in both directions (the tensor's smaller eigenvalue)
    low = (gxx + gyy) / 2 - np.sqrt(((gxx - gyy) / 2) ** 2 + gxy**2)
    ok = textured & (ncc >= CELL_NCC) & (n >= 0.98) & (low >= MIN_GRADIENT**2 * n)
    det = np.where(ok, det, 1.0)
    dx, dy = -(gyy * bx - gxy * by) / det, -(gxx * by - gxy * bx) / det
    at = np.flatnonzero(ok)
    shift = _affine_residual(dx[ok], dy[ok], at, ch, cw)
    bend = _bend(dx[ok], dy[ok], at, ch, cw)
    weak = float((counted & ~agree).sum() / cells)
    moved = float((shift >= MOVED_PX).sum() / cells)
    p90 = _p90(shift)
    nu = n * live
    tot = nu.sum()
    ga, gb = (ma * nu).sum() / tot, (mb * nu).sum() / tot
    saa = ((va + ma * ma) * nu).sum() / tot - ga * ga
    sbb = ((vb + mb * mb) * nu).sum() / tot - gb * gb
    sab = ((cov + ma * mb) * nu).sum() / tot - ga * gb
    overall = float(sab / math.sqrt(max(saa * sbb, 1e-9))) if saa > 1 and sbb > 1 else (1.0 if weak == 0 else -1.0)
    is_copy = bend <= MAX_BEND and (
        (weak <= MAX_WEAK and moved <= MAX_MOVED and p90 <= MAX_SHIFT_P90)
        or (weak <= MAX_WEAK_IN_PLACE and moved <= 0.05 and p90 <= TIGHT_SHIFT_P90)
    )
    if is_copy:
        why = (f"the same pixels after alignment: {1 - weak:.0%} of {cells} cells agree, residual shift "
               f"{p90:.2f} px (90th percentile at {SIDE} px)")  # fmt: skip
        tier = "copy"
    else:
        reasons = []
        if weak > MAX_WEAK:
            reasons.append(f"{weak:.0%} of {cells} cells differ (motion, other light or content)")
        if bend > MAX_BEND:
            reasons.append(f"the residual shifts bend by {bend:.2f} px toward the corners (perspective)")
        if moved > MAX_MOVED or p90 > MAX_SHIFT_P90:
            reasons.append(f"{moved:.0%} of cells shifted by {MOVED_PX} px or more after the best affine fit "
                           f"(90th percentile {p90:.2f} px: parallax or perspective)")  # fmt: skip
        why = "another shot: " + "; ".join(reasons)
        tier = "similar" if overall >= SIMILAR_NCC else "none"
    return Evidence(tier, why, cells, weak, moved, p90, overall, metrics={"bend": bend})


def _p90(x: np.ndarray) -> float:
    """`np.percentile(x, 90)` (linear interpolation) of a few dozen values, without its overhead (0 when empty)."""
    if len(x) == 0:
        return 0.0
    s = np.sort(x)
    pos = 0.9 * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    t, d = pos - lo, s[hi] - s[lo]
    return float(s[hi] - d * (1 - t) if t >= 0.5 else s[lo] + d * t)  # numpy's own rounding of the interpolation


def _least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of a small, usually well-posed fit: the normal equations (a tenth of
    `lstsq`'s cost on a 64 x 6 design), and `lstsq`'s minimum-norm answer when they are near singular."""
    g = design.T @ design
    scale = np.sqrt(np.diag(g))
    if np.all(scale > 0):
        gn = g / np.outer(scale, scale)  # unit diagonal: the determinant measures how independent the columns are
        if np.linalg.det(gn) > 1e-10:
            return np.linalg.solve(g, design.T @ target)
    return np.linalg.lstsq(design, target, rcond=None)[0]


def _affine_residual(dx: np.ndarray, dy: np.ndarray, at: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """Cell shifts left after the best affine fit of the shift field: an alignment slightly off (a half-pixel
    decoder phase, a scale a little wrong) is affine and removed; parallax and perspective are not."""
    if len(at) < 6:
        return np.hypot(dx, dy)
    cy, cx = (at // GRID + 0.5) * ch, (at % GRID + 0.5) * cw
    design = np.stack([cx, cy, np.ones_like(cx)], 1)
    coef = _least_squares(design, np.stack([dx, dy], 1))
    rest = np.stack([dx, dy], 1) - design @ coef
    return np.hypot(rest[:, 0], rest[:, 1])


def _bend(dx: np.ndarray, dy: np.ndarray, at: np.ndarray, ch: int, cw: int) -> float:
    """Largest displacement (pixels) that quadratic terms add to the best affine fit of the shift field over the
    measured cells: perspective (another viewpoint of a plane) bends it, a copy's field is flat noise."""
    if len(at) < 12:
        return 0.0
    u, v = (at % GRID + 0.5) / GRID - 0.5, (at // GRID + 0.5) / GRID - 0.5
    design = np.stack([u, v, np.ones_like(u), u * u, u * v, v * v], 1)
    coef = _least_squares(design, np.stack([dx, dy], 1))
    # evaluated at the measured cells, not extrapolated to the corners: few cells near the centre prove little
    quad = design[:, 3:] @ coef[3:]
    quad -= quad.mean(0)
    return float(np.hypot(quad[:, 0], quad[:, 1]).max())
