"""Spatial re-ranking of search candidates, and the local-features source it reads from.

Candidates' features come from the index's feature store when it has them and are otherwise extracted from the
indexed file on demand (kept in a small in-process cache, so a server pays once per file). Verified candidates
(at least `MIN_INLIERS` RANSAC inliers) move to the front, most inliers first; the rest keep their global order.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .feature_store import FeatureStore
from .local_features import MAX_FEATURES, MAX_SIDE, LocalFeatures, extract
from .matching import MIN_INLIERS, Verification, verify


class FeatureSource:
    """Local features of indexed files by (sha256, path): stored ones first, else extracted and cached."""

    def __init__(
        self, index_dir: Path, cache_size: int = 4096, max_features: int | None = None, max_side: int | None = None
    ) -> None:
        """`max_features`/`max_side` set on-demand extraction (default: the stored features' settings)."""
        self.index_dir = Path(index_dir)
        self.max_features, self.max_side = max_features, max_side
        self.threads = max(1, min(4, os.cpu_count() or 1))
        self._store: FeatureStore | None = None
        self._cache: OrderedDict[str, LocalFeatures] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _db(self) -> FeatureStore | None:
        if self._store is None and FeatureStore.exists(self.index_dir):
            self._store = FeatureStore.open(self.index_dir)
        return self._store

    def extract(self, source: Any) -> LocalFeatures:
        db = self._db()
        settings = db.settings if db is not None else {}
        return extract(source, self.max_features or int(settings.get("max_features", MAX_FEATURES)),
                       self.max_side or int(settings.get("max_side", MAX_SIDE)))  # fmt: skip

    def stored(self, shas: Sequence[str]) -> dict[str, LocalFeatures]:
        """The features already at hand (cache or feature store), without reading any image."""
        out: dict[str, LocalFeatures] = {}
        with self._lock:
            for sha in shas:
                if sha in self._cache:
                    self._cache.move_to_end(sha)
                    out[sha] = self._cache[sha]
            db = self._db()
            want = [sha for sha in shas if sha not in out]
            if db is not None and want:
                out.update(db.get(want))
        return out

    def features(
        self, items: Sequence[tuple[str, str]], may_read: Callable[[str], bool] | None = None
    ) -> list[LocalFeatures | None]:
        """Features for each (sha256, path); None where the file can no longer be read, or where features are not
        stored and `may_read(path)` refuses reading the file (a server reads only inside the index's roots)."""
        # imported vectors have no content hash: their files are known by path
        items = [(f"path:{p}" if sha.startswith("vector:") else sha, p) for sha, p in items]
        out: dict[str, LocalFeatures | None] = dict(self.stored([sha for sha, _ in items]))
        missing = list(dict.fromkeys((sha, p) for sha, p in items if sha not in out))
        if may_read is not None:
            out.update({sha: None for sha, p in missing if not may_read(p)})
            missing = [(sha, p) for sha, p in missing if sha not in out]

        def one(item: tuple[str, str]) -> LocalFeatures | None:
            try:
                return self.extract(item[1])
            except Exception:  # moved or damaged since indexing: it just is not verified
                return None

        if missing:
            with ThreadPoolExecutor(min(self.threads, len(missing))) as pool:  # OpenCV and Pillow release the GIL
                out.update(zip((sha for sha, _ in missing), pool.map(one, missing), strict=True))
        with self._lock:
            for sha, f in out.items():
                if f is not None:
                    self._cache[sha] = f
                    self._cache.move_to_end(sha)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return [out[sha] for sha, _ in items]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def verify_candidates(
    query: LocalFeatures, candidates: Sequence[LocalFeatures | None], threads: int = 2
) -> list[Verification]:
    """Verification per candidate (inliers 0 for unreadable ones), in the given order."""
    present = [i for i, c in enumerate(candidates) if c is not None]
    found = verify(query, [candidates[i] for i in present], threads=threads)
    out = [Verification(0, 0)] * len(candidates)
    for i, v in zip(present, found, strict=True):
        out[i] = v
    return out


def rerank_order(scores: Sequence[float], inliers: Sequence[int], rest_by_score: bool = False) -> list[int]:
    """Positions in re-ranked order: verified first by inliers (ties: global score), then the rest as they were
    (or, with `rest_by_score`, by global score: fused candidates that are not verified fall back to it)."""
    verified = [i for i, n in enumerate(inliers) if n >= MIN_INLIERS]
    rest = [i for i, n in enumerate(inliers) if n < MIN_INLIERS]
    verified.sort(key=lambda i: (-inliers[i], -scores[i], i))
    if rest_by_score:
        rest.sort(key=lambda i: (-scores[i], i))
    return verified + rest
