"""Geometric confirmation of near-duplicate pairs (`dedup --verify`): keep copies, drop look-alikes.

A pair is kept when local features match under a homography (enough RANSAC inliers) and the warped images agree
where one covers the other (see `spatial.copies`). Each image's features and small grey copy are made once per run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_INLIERS = 10  # fewer than for re-ranking: the image comparison that follows is the stricter test


@dataclass
class PairVerdicts:
    keep: np.ndarray  # bool per pair
    inliers: np.ndarray  # int per pair


def verify_pairs(
    index_dir: Path,
    rows: Sequence[Any],
    i: np.ndarray,
    j: np.ndarray,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 2,
) -> PairVerdicts:
    """Verdicts for pairs (rows[i[k]], rows[j[k]]); unreadable files are never confirmed."""
    from ..spatial.copies import CHECK_SIDE, check_copy
    from ..spatial.local_features import grey_image, require_cv2
    from ..spatial.matching import verify
    from ..spatial.rerank import FeatureSource

    require_cv2()
    keep = np.zeros(len(i), bool)
    inliers = np.zeros(len(i), np.int32)
    if len(i) == 0:
        return PairVerdicts(keep, inliers)
    involved = np.unique(np.concatenate([i, j]))
    source = FeatureSource(index_dir, cache_size=len(involved) + 1)
    try:
        feats = dict(zip(involved.tolist(), source.features([(rows[x].sha256, rows[x].path) for x in involved]),
                         strict=True))  # fmt: skip
    finally:
        source.close()
    greys: dict[int, np.ndarray | None] = {}

    def grey(x: int) -> np.ndarray | None:
        if x not in greys:
            try:
                greys[x] = grey_image(rows[x].path, CHECK_SIDE)
            except Exception:
                greys[x] = None
        return greys[x]

    order = np.argsort(i, kind="stable")
    starts = np.flatnonzero(np.r_[True, i[order][1:] != i[order][:-1]])
    ends = np.r_[starts[1:], len(order)]
    done = 0

    def one_query(span: tuple[int, int]) -> list[tuple[int, int, bool]]:
        ks = order[span[0] : span[1]]
        q = feats[int(i[ks[0]])]
        if q is None:
            return [(int(k), 0, False) for k in ks]
        present = [k for k in ks if feats[int(j[k])] is not None]
        found = verify(q, [feats[int(j[k])] for k in present], threads=1)
        out = [(int(k), 0, False) for k in ks if feats[int(j[k])] is None]
        for k, v in zip(present, found, strict=True):
            ok = False
            if v.inliers >= MIN_INLIERS and v.homography is not None:
                gq, gc = grey(int(i[k])), grey(int(j[k]))
                ok = gq is not None and gc is not None and check_copy(gq, gc, v.homography).is_copy
            out.append((int(k), v.inliers, ok))
        return out

    with ThreadPoolExecutor(max(1, threads)) as pool:  # OpenCV and Pillow release the GIL
        for result in pool.map(one_query, zip(starts.tolist(), ends.tolist(), strict=True)):
            for k, n, ok in result:
                inliers[k], keep[k] = n, ok
            done += len(result)
            if progress:
                progress(done, len(i))
    return PairVerdicts(keep, inliers)
