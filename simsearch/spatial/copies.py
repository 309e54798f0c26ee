"""Is a geometrically matched pair a copy? Warp one image onto the other and compare them cell by cell.

A homography with many inliers says two images show the same surface somewhere; a copy (a crop, a resize, a
re-encode, a brightness change, a caption) also agrees almost everywhere one image covers the other. Two different
photos taken against the same background match on the background but disagree where their subjects are, and are
dropped. Agreement is normalised cross-correlation per grid cell (gain and offset invariant, so exposure edits
pass); flat cells agree when both are flat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .local_features import MAX_SIDE, require_cv2

CHECK_SIDE = 192  # longer side of the grey images compared
GRID = 8  # cells per side
MIN_CONTAINED = 0.80  # the more-covered image must lie at least this much inside the other
MIN_AGREEMENT = 0.85  # share of compared cells that must agree
CELL_NCC = 0.5
FLAT_STD = 4.0
STRONG_STD = 16.0  # texture this strong where the other image is flat is a real difference
CLIPPED = (4.0, 251.0)  # grey levels at or beyond these have lost their detail to clipping


@dataclass
class CopyCheck:
    contained: float  # share of the more-covered image that the other one covers
    agreement: float  # share of its covered cells where both images agree

    @property
    def is_copy(self) -> bool:
        return self.contained >= MIN_CONTAINED and self.agreement >= MIN_AGREEMENT


def check_copy(grey_q: np.ndarray, grey_c: np.ndarray, homography: np.ndarray) -> CopyCheck:
    """Compare candidate `grey_c` with query `grey_q` (small grey copies, e.g. `grey_image(path, CHECK_SIDE)`),
    given the homography from candidate to query pixels at MAX_SIDE scale (see `matching.fit_homography`)."""
    cv2 = require_cv2()
    sq, sc = max(grey_q.shape) / MAX_SIDE, max(grey_c.shape) / MAX_SIDE
    h = np.diag([sq, sq, 1.0]) @ homography @ np.diag([1 / sc, 1 / sc, 1.0])
    try:
        h_inv = np.linalg.inv(h)
    except np.linalg.LinAlgError:
        return CopyCheck(0.0, 0.0)
    cover_q = _coverage(grey_c.shape, grey_q.shape, h)  # share of the query covered by the candidate
    cover_c = _coverage(grey_q.shape, grey_c.shape, h_inv)
    if cover_q >= cover_c:  # compare in the frame of the image that is more inside the other
        base, other, m, contained = grey_q, grey_c, h, cover_q
    else:
        base, other, m, contained = grey_c, grey_q, h_inv, cover_c
    hb, wb = base.shape
    warped = cv2.warpPerspective(other, m, (wb, hb), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpPerspective(np.full(other.shape, 255, np.uint8), m, (wb, hb), flags=cv2.INTER_NEAREST)
    mask = cv2.erode(mask, np.ones((5, 5), np.uint8))  # edge pixels blend with what lies outside
    return CopyCheck(contained, _agreement(base.astype(np.float32), warped.astype(np.float32), mask > 0))


def _coverage(src_shape: tuple[int, ...], dst_shape: tuple[int, ...], h: np.ndarray) -> float:
    """Share of the destination image's area that the source image lands on under `h`."""
    cv2 = require_cv2()
    hs, ws = src_shape[:2]
    hd, wd = dst_shape[:2]
    corners = np.array([[[0, 0]], [[ws, 0]], [[ws, hs]], [[0, hs]]], np.float32)
    poly = cv2.perspectiveTransform(corners, h).reshape(-1, 2)
    canvas = np.zeros((hd, wd), np.uint8)
    cv2.fillConvexPoly(canvas, np.round(poly).astype(np.int32), 1)
    return float(canvas.mean())


def _agreement(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    h, w = a.shape
    ys = np.linspace(0, h, GRID + 1).astype(int)
    xs = np.linspace(0, w, GRID + 1).astype(int)
    # pixels blown out or crushed in either image have lost their detail (a brightness edit clips): left out
    usable = mask & (a > CLIPPED[0]) & (a < CLIPPED[1]) & (b > CLIPPED[0]) & (b < CLIPPED[1])
    agree = total = 0
    for y0, y1 in zip(ys[:-1], ys[1:], strict=True):
        for x0, x1 in zip(xs[:-1], xs[1:], strict=True):
            m = mask[y0:y1, x0:x1]
            if m.size == 0 or m.mean() < 0.9:
                continue
            u = usable[y0:y1, x0:x1]
            if u.mean() < 0.5:
                continue  # mostly clipped: says nothing either way
            ca, cb = a[y0:y1, x0:x1][u], b[y0:y1, x0:x1][u]
            sa, sb = ca.std(), cb.std()
            if min(sa, sb) < FLAT_STD <= max(sa, sb) < STRONG_STD:
                continue  # flat against faint texture: a clipping or smoothing edit looks like this
            total += 1
            if sa < FLAT_STD or sb < FLAT_STD:
                agree += bool(sa < FLAT_STD and sb < FLAT_STD)
                continue
            ncc = float(((ca - ca.mean()) * (cb - cb.mean())).mean() / (sa * sb))
            agree += ncc >= CELL_NCC
    return agree / total if total else 0.0
