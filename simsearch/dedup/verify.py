"""Pair verdicts for dedup: copies, other shots of the same scene (similar), or look-alikes (dropped).

`tier_pairs` decides every candidate pair from small aligned thumbnails first (`tiers.compare`: the same pixels in
place = a copy; aligned but moved or changed = another shot), and only pairs the pixels cannot place go to local
features: a homography with enough inliers seeds the alignment again, too few inliers mean look-alikes.

Pairs go best score first; with `connected`, a pair whose files are already joined by copies is a copy without a
look. Each file is decoded at most once per run, only when a looked-at pair needs it; many pairs are split, whole
components of the pair graph at a time, over one worker process per core.
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


def local_features(path: str, stored: Any = None) -> Any:
    """An image's local features for dedup: `stored` ones, or extracted from one decode at DEDUP_SIDE."""
    from ..images import open_image
    from ..spatial.local_features import extract

    return stored or extract(open_image(path, target=DEDUP_SIDE), DEDUP_FEATURES, DEDUP_SIDE)


COPY, SIMILAR, NONE = 2, 1, 0
SIMILAR_INLIERS = 15  # local-feature inliers that make a pixel-misaligned pair the same object (as re-ranking)


@dataclass
class PairTiers:
    tier: np.ndarray  # int8 per pair: COPY, SIMILAR or NONE
    implied: np.ndarray  # bool per pair: a copy because its files are already joined by copies (not checked)
    no_verdict: np.ndarray  # bool per pair: unreadable, or too little texture to tell
    local: np.ndarray  # bool per pair: local features were needed
    thumbs: dict[int, Any]  # position -> tiers.Thumb of every file looked at (for the best-shot rule)


PARALLEL_MIN_PAIRS = 400  # fewer pairs are decided in-process: starting worker processes costs about 0.5 s


def tier_pairs(
    index_dir: Path,
    rows: Sequence[Any],
    i: np.ndarray,
    j: np.ndarray,
    s: np.ndarray,
    connected: bool = True,
    local: bool = True,
    sure_above: float | None = None,
    rotations: bool = False,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 2,
) -> PairTiers:
    """The tier of each pair (rows[i[k]], rows[j[k]]) scoring s[k], best score first.

    `connected`: a pair whose files are already joined by copies is a copy without a check. `local`: pairs the
    pixels do not place are matched by local features (else they are other shots by cosine); pairs at or above
    `sure_above` never need them (related for sure: the pixels only say which tier). Each file is decoded once.

    With `threads` > 1 and many pairs, the connected components of the pair graph (which share no file) are split
    over that many worker processes: the per-pair work is many small numpy steps that hold the GIL, so threads
    would not use the second core."""
    args = (index_dir, rows, i, j, s, connected, local, sure_above, rotations)
    if threads > 1 and len(i) >= PARALLEL_MIN_PAIRS:
        try:
            return _tier_pairs_split(args, threads, progress)
        except Exception as err:  # no workers here (or one failed): the same work in-process, errors and all
            import logging

            logging.getLogger(__name__).debug("tier_pairs in-process: %s", err)
    return _tier_pairs_here(*args, progress=progress, threads=threads)


def _tier_pairs_split(args: tuple, workers: int, progress: Callable[[int, int], None] | None) -> PairTiers:
    """`_tier_pairs_here` on bins of whole components, one child Python per bin. Children are plain
    `python -c` processes fed a pickle on stdin (not multiprocessing: no fork of a threaded process, and the
    caller's main module is never re-imported)."""
    import os
    import pickle
    import subprocess
    import sys

    from .graph import connected_groups

    index_dir, rows, i, j, s, *rest = args
    n = len(i)
    label = np.arange(len(rows))
    for g in connected_groups(len(rows), i, j):
        label[g] = g[0]
    comp = label[i]
    ids, counts = np.unique(comp, return_counts=True)
    load = np.zeros(workers)
    bin_of = np.zeros(len(rows), np.int64)
    for c, m in sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda x: -x[1]):
        b = int(load.argmin())
        bin_of[c], load[b] = b, load[b] + m
    pair_bin = bin_of[comp]
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    code = "from simsearch.dedup.verify import _tier_worker_stdio as w; w()"
    jobs = []
    try:
        for b in range(workers):
            sel = np.flatnonzero(pair_bin == b)
            if not len(sel):
                continue
            proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    env=env)  # fmt: skip
            jobs.append((sel, proc))
            assert proc.stdin is not None
            proc.stdin.write(pickle.dumps((index_dir, rows, i[sel], j[sel], s[sel], *rest), protocol=5))
            proc.stdin.close()
        out = PairTiers(np.zeros(n, np.int8), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), {})
        done = 0
        for sel, proc in jobs:
            assert proc.stdout is not None
            data = proc.stdout.read()
            if proc.wait() != 0 or not data:
                raise RuntimeError(f"a tier worker failed (exit {proc.returncode})")
            part: PairTiers = pickle.loads(data)
            out.tier[sel], out.implied[sel], out.no_verdict[sel], out.local[sel] = (
                part.tier, part.implied, part.no_verdict, part.local)  # fmt: skip
            out.thumbs.update(part.thumbs)
            done += len(sel)
            if progress:
                progress(done, n)
        return out
    finally:
        for _, proc in jobs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _tier_worker_stdio() -> None:
    """Child side of `_tier_pairs_split`: arguments pickled on stdin, the PairTiers pickled to stdout."""
    import pickle
    import sys

    import cv2

    cv2.setNumThreads(1)  # one process per core already
    args = pickle.loads(sys.stdin.buffer.read())
    result = _tier_pairs_here(*args, threads=1)
    sys.stdout.buffer.write(pickle.dumps(result, protocol=5))
    sys.stdout.flush()


def _tier_pairs_here(
    index_dir: Path,
    rows: Sequence[Any],
    i: np.ndarray,
    j: np.ndarray,
    s: np.ndarray,
    connected: bool = True,
    local: bool = True,
    sure_above: float | None = None,
    rotations: bool = False,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 2,
) -> PairTiers:
    """`tier_pairs` in this process (threads for decoding and OpenCV, which release the GIL)."""
    from .tiers import compare, load_thumb

    n = len(i)
    tier = np.zeros(n, np.int8)
    implied = np.zeros(n, bool)
    no_verdict = np.zeros(n, bool)
    used_local = np.zeros(n, bool)
    thumbs: dict[int, Any] = {}
    feats: dict[int, Any] = {}
    copies = UnionFind(len(rows)) if connected else None
    linked = UnionFind(len(rows))  # copies or other shots

    def thumb(x: int) -> None:
        try:
            thumbs[x] = load_thumb(rows[x].path)
        except Exception:  # unreadable now: no verdict
            thumbs[x] = None

    def judge(k: int) -> tuple[int, Any]:
        ta, tb = thumbs[int(i[k])], thumbs[int(j[k])]
        if ta is None or tb is None:
            return k, None
        return k, compare(ta, tb, rotations=rotations)

    source = None
    order = np.argsort(-s, kind="stable")
    last = np.full(len(rows), -1, np.int64)  # each file's last pair in `order`: its pixels can go after that
    np.maximum.at(last, i[order], np.arange(n))
    np.maximum.at(last, j[order], np.arange(n))
    release: dict[int, list[int]] = {}  # chunk -> files whose last pair is in it
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool:  # OpenCV, numpy and Pillow release the GIL
            for a in range(0, n, _CHUNK):
                chunk = order[a : a + _CHUNK]
                if copies is not None:
                    known = np.array([copies.connected(int(i[k]), int(j[k])) for k in chunk], bool)
                    tier[chunk[known]], implied[chunk[known]] = COPY, True
                    chunk = chunk[~known]
                need = sorted({int(x) for k in chunk for x in (i[k], j[k])} - thumbs.keys())
                list(pool.map(thumb, need))
                for x in need:
                    release.setdefault(int(last[x]) // _CHUNK, []).append(x)
                unsure = []

                def sequential(ks: list[int]) -> Any:
                    """One thread: look at each pair only once the pairs before it are joined (fewer looks)."""
                    for k in ks:
                        if copies is not None and copies.connected(int(i[k]), int(j[k])):
                            tier[k], implied[k] = COPY, True
                            continue
                        yield judge(k)

                looks = sequential(chunk.tolist())
                for k, ev in looks:
                    x, y = int(i[k]), int(j[k])
                    if ev is None:
                        no_verdict[k] = True
                    elif ev.tier == "copy":
                        tier[k] = COPY
                        linked.union(x, y)
                        if copies is not None:
                            copies.union(x, y)
                    elif ev.tier == "similar" or (sure_above is not None and s[k] >= sure_above) or not local:
                        tier[k] = SIMILAR
                        linked.union(x, y)
                    elif not linked.connected(x, y):
                        unsure.append(k)
                    else:
                        tier[k] = SIMILAR  # already one scene through other pairs: no need to look closer
                if unsure:
                    if source is None:
                        from ..spatial.local_features import require_cv2
                        from ..spatial.rerank import FeatureSource

                        require_cv2()
                        source = FeatureSource(index_dir)
                    _local_tiers(pool, source, rows, i, j, unsure, feats, thumbs, tier, no_verdict, rotations)
                    used_local[unsure] = True
                    for k in unsure:
                        if tier[k] != NONE:
                            linked.union(int(i[k]), int(j[k]))
                        if tier[k] == COPY and copies is not None:
                            copies.union(int(i[k]), int(j[k]))
                for x in release.pop(a // _CHUNK, []):
                    if thumbs.get(x) is not None:
                        thumbs[x].grey = None  # done with its pairs: keep only the facts (memory stays bounded)
                if progress:
                    progress(min(n, a + _CHUNK), n)
    finally:
        if source is not None:
            source.close()
    return PairTiers(tier, implied, no_verdict, used_local, {k: v for k, v in thumbs.items() if v is not None})


def _local_tiers(pool: Any, source: Any, rows: Sequence[Any], i: np.ndarray, j: np.ndarray, ks: list[int],
                 feats: dict[int, Any], thumbs: dict[int, Any], tier: np.ndarray, no_verdict: np.ndarray,
                 rotations: bool) -> None:  # fmt: skip
    """Tiers of pairs the pixels could not place: local features, then the pixels again from their homography."""

    def prepare(x: int) -> None:
        stored = source.stored([rows[x].sha256]).get(rows[x].sha256)
        try:
            feats[x] = local_features(rows[x].path, stored)
        except Exception:
            feats[x] = None

    list(pool.map(prepare, sorted({int(x) for k in ks for x in (i[k], j[k])} - feats.keys())))

    def one(k: int) -> tuple[int, int, bool]:
        a, b = int(i[k]), int(j[k])
        fa, fb = feats[a], feats[b]
        if fa is None or fb is None or thumbs.get(a) is None or thumbs.get(b) is None:
            return k, NONE, True
        return (k, *local_tier(fa, fb, thumbs[a], thumbs[b], rotations)[:2])

    for k, t, bad in pool.map(one, ks):
        tier[k], no_verdict[k] = t, bad


def local_tier(fa: Any, fb: Any, ta: Any, tb: Any, rotations: bool = False) -> tuple[int, bool, int]:
    """(tier, no verdict, inliers) of a pair from local features: the homography seeds the pixel comparison."""
    from ..spatial.local_features import MAX_SIDE
    from ..spatial.matching import fit_homography, tentative_matches
    from .tiers import compare

    v = fit_homography(fa, fb, tentative_matches(fa, [fb])[0])
    if v.inliers < MIN_INLIERS and min(len(fa), len(fb)) < MIN_KEYPOINTS:
        return NONE, True, v.inliers
    if v.inliers < MIN_INLIERS or v.homography is None:
        return NONE, False, v.inliers
    # fit_homography maps b to a at MAX_SIDE scale; compare wants b thumbnail pixels -> a thumbnail pixels
    sa, sb = max(ta.grey.shape) / MAX_SIDE, max(tb.grey.shape) / MAX_SIDE
    h = np.diag([sa, sa, 1.0]) @ v.homography @ np.diag([1 / sb, 1 / sb, 1.0])
    ev = compare(ta, tb, init=h, rotations=rotations)
    if ev.tier == "copy":
        return COPY, False, v.inliers
    return (SIMILAR if v.inliers >= SIMILAR_INLIERS else NONE), False, v.inliers
