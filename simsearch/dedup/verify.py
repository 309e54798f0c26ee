"""Geometric confirmation of near-duplicate pairs: keep copies, drop look-alikes.

A pair is kept when local features match under a homography (enough RANSAC inliers) and the warped images agree
where one covers the other (see `spatial.copies`). Pairs go best score first; with `connected`, a pair whose files
are already joined by confirmed pairs cannot change the groups and is not checked. Each image's features and small
grey copy are made at most once per run, only for images a checked pair needs, on every core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .graph import UnionFind

MIN_INLIERS = 10  # fewer than for re-ranking: the image comparison that follows is the stricter test
MIN_KEYPOINTS = 64  # too few inliers between images this poor in texture (flat, smooth, tiny) prove nothing
DEDUP_FEATURES, DEDUP_SIDE = 256, 320  # on-demand features: as accurate on copies as 512 at 512, 2x faster
_CHUNK = 256


def prepare_image(path: str, stored: Any = None) -> tuple[Any, np.ndarray]:
    """An image's features for dedup (`stored` ones, or extracted) and its small grey copy, from one decode."""
    from ..images import open_image
    from ..spatial.copies import CHECK_SIDE
    from ..spatial.local_features import extract, grey_image

    im = open_image(path, target=DEDUP_SIDE)
    return stored or extract(im, DEDUP_FEATURES, DEDUP_SIDE), grey_image(im, CHECK_SIDE)


def judge_pair(fa: Any, fb: Any, ga: np.ndarray, gb: np.ndarray) -> tuple[int, bool | None]:
    """(inliers, verdict) for two images' features and grey copies: True a copy, False not, None no verdict
    (too few inliers between images too poor in texture to tell)."""
    from ..spatial.copies import check_copy
    from ..spatial.matching import fit_homography, tentative_matches

    v = fit_homography(fa, fb, tentative_matches(fa, [fb])[0])
    if v.inliers < MIN_INLIERS and min(len(fa), len(fb)) < MIN_KEYPOINTS:
        return v.inliers, None
    if v.inliers < MIN_INLIERS or v.homography is None:
        return v.inliers, False
    return v.inliers, check_copy(ga, gb, v.homography).is_copy


@dataclass
class PairVerdicts:
    keep: np.ndarray  # bool per pair: confirmed, or implied by confirmed pairs (connected mode)
    inliers: np.ndarray  # int per pair; -1 where not checked because already implied
    no_verdict: np.ndarray  # bool per pair: no verdict (a file could not be read, or has too few keypoints)

    @property
    def checked(self) -> int:
        return int(((self.inliers >= 0) & ~self.no_verdict).sum())


def verify_pairs(
    index_dir: Path,
    rows: Sequence[Any],
    i: np.ndarray,
    j: np.ndarray,
    s: np.ndarray,
    joined: UnionFind | None = None,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 2,
) -> PairVerdicts:
    """Verdicts for pairs (rows[i[k]], rows[j[k]]) scoring s[k]. `joined` (connected grouping) holds the unions
    already made; pairs inside one set are implied, and confirmed pairs are added to it."""
    from ..spatial.local_features import LocalFeatures, require_cv2
    from ..spatial.rerank import FeatureSource

    require_cv2()
    n = len(i)
    keep = np.zeros(n, bool)
    inliers = np.full(n, -1, np.int32)
    no_verdict = np.zeros(n, bool)
    source = FeatureSource(index_dir)
    feats: dict[int, LocalFeatures | None] = {}
    greys: dict[int, np.ndarray | None] = {}

    def prepare(x: int) -> None:
        """Decode once: the features (unless stored) and the grey copy come from the same image."""
        stored = source.stored([rows[x].sha256]).get(rows[x].sha256)
        try:
            feats[x], greys[x] = prepare_image(rows[x].path, stored)
        except Exception:  # unreadable now: no verdict
            feats[x] = greys[x] = None

    def judge(k: int) -> tuple[int, int, bool, bool]:
        a, b = int(i[k]), int(j[k])
        fa, fb, ga, gb = feats[a], feats[b], greys[a], greys[b]
        if fa is None or fb is None or ga is None or gb is None:
            return k, 0, False, True
        inliers, verdict = judge_pair(fa, fb, ga, gb)
        return k, inliers, bool(verdict), verdict is None

    order = np.argsort(-s, kind="stable")
    done = 0
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:  # OpenCV and Pillow release the GIL
            for a in range(0, n, _CHUNK):
                chunk = order[a : a + _CHUNK]
                if joined is not None:
                    implied = np.array([joined.connected(int(i[k]), int(j[k])) for k in chunk], bool)
                    keep[chunk[implied]] = True
                    chunk = chunk[~implied]
                need = sorted({int(x) for k in chunk for x in (i[k], j[k])} - feats.keys())
                list(pool.map(prepare, need))
                for k, count, ok, bad in pool.map(judge, chunk.tolist()):
                    inliers[k], keep[k], no_verdict[k] = count, ok, bad
                    if ok and joined is not None:
                        joined.union(int(i[k]), int(j[k]))
                done = min(n, a + _CHUNK)
                if progress:
                    progress(done, n)
    finally:
        source.close()
    return PairVerdicts(keep, inliers, no_verdict)
