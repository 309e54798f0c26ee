"""Geometric verification: match local features of a query against candidates and fit a homography with RANSAC.

Matching is batched: one matrix product scores every query descriptor against every candidate descriptor, then
each candidate's block gives its nearest and second-nearest neighbours for Lowe's ratio test. A homography is fitted
(OpenCV's MAGSAC++) to each candidate's tentative matches, and the inliers are what the caller ranks by.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .local_features import MAX_SIDE, LocalFeatures, require_cv2

RATIO = 0.85  # Lowe's ratio test on descriptor distances
MIN_MATCHES = 8  # fewer tentative matches: no homography is fitted
RANSAC_PIXELS = 6.0  # inlier reprojection error, in pixels of the image scaled to MAX_SIDE
MIN_INLIERS = 15  # below this a pair is not geometrically verified
_BLOCK = 64  # candidates scored per matrix product (bounds memory)


@dataclass
class Verification:
    """The outcome for one (query, candidate) pair: inlier count and the homography mapping candidate to query."""

    matches: int
    inliers: int
    homography: np.ndarray | None = None  # 3x3, candidate pixels -> query pixels (both scaled to MAX_SIDE)
    inlier_xy: np.ndarray | None = None  # (inliers, 2) query-side positions in [0, 1] fractions

    @property
    def verified(self) -> bool:
        return self.inliers >= MIN_INLIERS


def tentative_matches(query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[np.ndarray]:
    """For each candidate, (m, 2) index pairs (query keypoint, candidate keypoint) passing the ratio test."""
    out: list[np.ndarray] = [np.zeros((0, 2), np.int64)] * len(candidates)
    if len(query) < 2:
        return out
    cv2 = require_cv2()
    q = query.unit_descriptors()
    for start in range(0, len(candidates), _BLOCK):
        block = candidates[start : start + _BLOCK]
        width = max((len(c) for c in block), default=0)
        if width < 2:
            continue
        stacked = np.zeros((len(block) * width, q.shape[1]), np.float32)
        valid = np.zeros((len(block), width), bool)
        for b, c in enumerate(block):
            if len(c):
                stacked[b * width : b * width + len(c)] = c.unit_descriptors()
                valid[b, : len(c)] = True
        # OpenCV's GEMM: numpy's threaded BLAS is 5-20x slower on these small products when the cores are busy
        sims = cv2.gemm(q, stacked, 1.0, None, 0.0, flags=cv2.GEMM_2_T).reshape(len(q), len(block), width)
        sims[:, ~valid] = -2.0
        best = sims.argmax(axis=2)  # two max passes: far cheaper than argpartition over the last axis
        s_best = np.take_along_axis(sims, best[..., None], axis=2)[..., 0]
        np.put_along_axis(sims, best[..., None], -3.0, axis=2)
        s_second = sims.max(axis=2)
        d1 = np.sqrt(np.maximum(2 - 2 * s_best, 0))
        d2 = np.sqrt(np.maximum(2 - 2 * s_second, 0))
        ok = (d1 < RATIO * d2) & (s_best > -1.5) & (s_second > -1.5)
        for b in range(len(block)):
            qi = np.nonzero(ok[:, b])[0]
            out[start + b] = np.stack([qi, best[qi, b]], axis=1) if len(qi) else np.zeros((0, 2), np.int64)
    return out


def fit_homography(query: LocalFeatures, cand: LocalFeatures, pairs: np.ndarray) -> Verification:
    """RANSAC homography on the tentative `pairs`; degenerate fits count as unverified."""
    if len(pairs) < MIN_MATCHES:
        return Verification(len(pairs), 0)
    cv2 = require_cv2()
    # one-to-one: a candidate keypoint matched by several query keypoints keeps only its first
    _, first = np.unique(pairs[:, 1], return_index=True)
    pairs = pairs[np.sort(first)]
    if len(pairs) < MIN_MATCHES:
        return Verification(len(pairs), 0)
    pq = query.points(MAX_SIDE)[pairs[:, 0]]
    pc = cand.points(MAX_SIDE)[pairs[:, 1]]
    h, mask = cv2.findHomography(pc, pq, cv2.USAC_MAGSAC, RANSAC_PIXELS, maxIters=2000, confidence=0.999)
    if h is None or mask is None or not _plausible(h):
        return Verification(len(pairs), 0)
    keep = mask.ravel().astype(bool)
    return Verification(len(pairs), int(keep.sum()), h, query.xy[pairs[keep, 0]].astype(np.float32))


def _plausible(h: np.ndarray) -> bool:
    """Reject homographies that flip, collapse or blow up the image (RANSAC fits to a few collinear points)."""
    if not np.all(np.isfinite(h)) or abs(h[2, 2]) < 1e-9:
        return False
    a = h[:2, :2] / h[2, 2]
    det = float(np.linalg.det(a))
    return 1 / 64 < det < 64 and float(np.abs(h[2, :2] / h[2, 2]).max()) < 0.01


def verify(query: LocalFeatures, candidates: Sequence[LocalFeatures], threads: int = 2) -> list[Verification]:
    """Verification of each candidate against the query, in the candidates' order."""
    pairs = tentative_matches(query, candidates)
    if threads <= 1 or len(candidates) < 4:
        return [fit_homography(query, c, p) for c, p in zip(candidates, pairs, strict=True)]
    with ThreadPoolExecutor(threads) as pool:  # OpenCV releases the GIL while it fits
        return list(pool.map(lambda cp: fit_homography(query, *cp), zip(candidates, pairs, strict=True)))
