"""Near-duplicate grouping at scale: thresholded similarity pairs and graph grouping.

Everything works on row positions of an (N, d) float32 array of L2-normalised embeddings, never builds an
N x N matrix and never loops over pairs in Python. Memory is O(N * d + edges): the vectors are read in
blocks (a ``np.memmap`` works) and no second full copy of them is made.

Two ways to find the pairs with inner product >= threshold:

* exact: blocked upper-triangle matrix products (BLAS), ``N**2 * d`` multiply-adds, each pair computed once.
  This is what ``IndexFlatIP.range_search`` does, at half the work and without copying the vectors into an
  index.
* approximate (large N): an inverted file built on the fly. Spherical k-means centroids from a sample, each
  vector goes to its best centroid (its list) and probes its ``nprobe`` best centroids; for every list the
  probing vectors are multiplied against the list members with BLAS. A pair is found when either vector
  probes the other's list. Scores always come from the original vectors, so they are exact; only recall
  is approximate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import faiss
import numpy as np

EXACT_MAX_N = 20_000
"""``exact=None`` uses exact search up to this many vectors. Measured on 2 cores: at 20k vectors exact takes
1.5 s (d=256) / 3.3 s (d=1280) vs 0.5 s / 1.4 s approximate, at 40k 6 s / 13 s vs 0.8 s / 2.3 s; below
20k exact is kept because it costs seconds and has perfect recall."""

DEFAULT_NPROBE = 32
"""Lists probed per vector in approximate mode (``nlist`` defaults to ``sqrt(nprobe * N)``, so the cost grows
with ``sqrt(nprobe)``). Measured on random data (the worst case for an inverted file), threshold 0.9:
N=100k, pairs at cosine 0.90-0.91: recall 0.998 with nprobe 16, 0.9996 with 32; N=1M with planted pairs at
0.93-0.99, nprobe 16 missed 1 of ~3.5k pairs (999/1000 groups) at both d=256 and d=1280; nprobe 32 found
1000/1000 at d=1280 but 999/1000 at d=256, where nprobe 64 found 1000/1000 (131 s, 2.25 GiB)."""

LOW_DIM_NPROBE = 64
"""Default nprobe below 512 dimensions: k-means lists separate low-dimensional vectors less cleanly."""


def default_nprobe(dim: int) -> int:
    return LOW_DIM_NPROBE if dim < 512 else DEFAULT_NPROBE


_BLOCK_ELEMS = 1 << 24
_MAX_LIST_BLOCK = 32768


class UnionFind:
    """Disjoint sets over ``0..n-1`` backed by one int64 parent array.

    Each set's root is its smallest member (union links the larger root under the smaller one), so roots
    and therefore groups do not depend on the order of unions. Path compression keeps finds cheap;
    ``union_many`` merges whole edge arrays with vectorised hooking and pointer jumping.
    """

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.parent.size)

    def find(self, x: int) -> int:
        """Root of ``x``, compressing the path walked."""
        parent = self.parent
        root = int(x)
        while parent[root] != root:
            root = int(parent[root])
        x = int(x)
        while parent[x] != root:
            parent[x], x = root, int(parent[x])
        return root

    def union(self, a: int, b: int) -> bool:
        """Merge the sets of ``a`` and ``b``; True when they were separate."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True

    def connected(self, a: int, b: int) -> bool:
        return self.find(a) == self.find(b)

    def _compress(self) -> None:
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        self.parent = parent

    def union_many(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the sets of every pair ``(a[k], b[k])`` without a Python loop over pairs."""
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise ValueError("a and b must have the same length")
        self._compress()
        while a.size:
            ra, rb = self.parent[a], self.parent[b]
            live = ra != rb
            if not live.any():
                break
            a, b, ra, rb = a[live], b[live], ra[live], rb[live]
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))
            self._compress()

    def roots(self) -> np.ndarray:
        """Root of every element (a fresh array)."""
        self._compress()
        return self.parent.copy()


def _as_rows(vectors: np.ndarray) -> np.ndarray:
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {vectors.shape}")
    if vectors.dtype != np.float32:
        raise TypeError(f"vectors must be float32, got {vectors.dtype}")
    return vectors


def _block(vectors: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    return np.ascontiguousarray(vectors[rows])


def _canonical(i: np.ndarray, j: np.ndarray, s: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs as i < j, unique, sorted by (i, j)."""
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    keep = lo != hi
    key = lo[keep] * np.int64(n) + hi[keep]
    key, first = np.unique(key, return_index=True)
    return key // n, key % n, s[keep][first].astype(np.float32, copy=False)


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)


def _concat(parts_i: list, parts_j: list, parts_s: list, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts_i:
        return _empty()
    return _canonical(np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s), n)


def rescore(vectors: np.ndarray, i: np.ndarray, j: np.ndarray, *, chunk: int = 8192) -> np.ndarray:
    """Exact inner products ``vectors[i[k]] . vectors[j[k]]`` computed from the vectors, chunk by chunk."""
    out = np.empty(len(i), dtype=np.float32)
    for a in range(0, len(i), chunk):
        sl = slice(a, a + chunk)
        out[sl] = np.einsum("ij,ij->i", vectors[i[sl]], vectors[j[sl]])
    return out


def _exact_pairs(vectors: np.ndarray, threshold: float, batch_size: int):
    n = vectors.shape[0]
    parts_i, parts_j, parts_s = [], [], []
    for a in range(0, n, batch_size):
        qa = _block(vectors, slice(a, a + batch_size))
        for b in range(a, n, batch_size):
            db = qa if b == a else _block(vectors, slice(b, b + batch_size))
            sims = qa @ db.T
            r, c = np.nonzero(sims >= threshold)
            if b == a:
                upper = c > r
                r, c = r[upper], c[upper]
            if r.size:
                parts_i.append(r + a)
                parts_j.append(c + b)
                parts_s.append(sims[r, c])
    return _concat(parts_i, parts_j, parts_s, n)


def _ivf_pairs(
    vectors: np.ndarray,
    threshold: float,
    batch_size: int,
    nprobe: int,
    nlist: int | None,
    seed: int,
    timings: dict[str, float],
):
    start = time.perf_counter()
    n, d = vectors.shape
    if nlist is None:
        nlist = int(math.sqrt(nprobe * n))
    nlist = max(1, min(nlist, n // 4 if n >= 4 else 1))
    nprobe = min(nprobe, nlist)

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, 16 * nlist), replace=False))
    kmeans = faiss.Kmeans(
        d, nlist, niter=6, spherical=True, seed=seed, min_points_per_centroid=1, max_points_per_centroid=10**9
    )
    kmeans.train(_block(vectors, sample))
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(kmeans.centroids)

    probes = np.empty((n, nprobe), dtype=np.int32)
    step = max(batch_size, 16384)
    for a in range(0, n, step):
        _, lab = quantizer.search(_block(vectors, slice(a, a + step)), nprobe)
        probes[a : a + step] = lab

    primary = probes[:, 0]
    list_rows = np.argsort(primary, kind="stable")
    list_ptr = np.concatenate(([0], np.cumsum(np.bincount(primary, minlength=nlist))))
    flat = probes.ravel()
    del probes
    probe_rows = np.argsort(flat, kind="stable") // nprobe
    probe_ptr = np.concatenate(([0], np.cumsum(np.bincount(flat, minlength=nlist))))
    del flat
    timings["index_build"] = time.perf_counter() - start

    start = time.perf_counter()
    parts_i, parts_j, parts_s = [], [], []
    for c in range(nlist):
        queries = probe_rows[probe_ptr[c] : probe_ptr[c + 1]]
        if queries.size == 0:
            continue
        for m0 in range(list_ptr[c], list_ptr[c + 1], _MAX_LIST_BLOCK):
            members = list_rows[m0 : min(m0 + _MAX_LIST_BLOCK, list_ptr[c + 1])]
            mv = _block(vectors, members)
            chunk = max(256, min(batch_size, _BLOCK_ELEMS // members.size))
            for a in range(0, queries.size, chunk):
                q = queries[a : a + chunk]
                sims = _block(vectors, q) @ mv.T
                r, k = np.nonzero(sims >= threshold)
                if r.size:
                    parts_i.append(q[r])
                    parts_j.append(members[k])
                    parts_s.append(sims[r, k])
    out = _concat(parts_i, parts_j, parts_s, n)
    timings["search"] = time.perf_counter() - start
    return out


def _index_positions(index) -> np.ndarray | None:
    """Row position of each id stored in an IndexIDMap(2), or None when labels already are positions."""
    if hasattr(index, "id_map"):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        if not np.array_equal(ids, np.arange(ids.size)):
            return ids
    return None


def _index_pairs(vectors: np.ndarray, threshold: float, batch_size: int, index, margin: float | None):
    n = vectors.shape[0]
    if index.ntotal != n:
        raise ValueError(f"index holds {index.ntotal} vectors but {n} were given")
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else faiss.downcast_index(index)
    if margin is None:
        margin = 1e-4 if isinstance(inner, faiss.IndexFlat) else 0.03
    ids = _index_positions(index)
    sorter = None if ids is None else np.argsort(ids, kind="stable")
    parts_i, parts_j, parts_s = [], [], []
    for a in range(0, n, batch_size):
        q = _block(vectors, slice(a, a + batch_size))
        lims, _, labels = index.range_search(q, float(threshold - margin))
        labels = labels.astype(np.int64)
        if sorter is not None:
            labels = sorter[np.searchsorted(ids, labels, sorter=sorter)]
        rows = np.repeat(np.arange(a, a + q.shape[0], dtype=np.int64), np.diff(lims).astype(np.int64))
        ahead = labels > rows
        parts_i.append(rows[ahead])
        parts_j.append(labels[ahead])
        parts_s.append(np.zeros(int(ahead.sum()), np.float32))
    i, j, _ = _concat(parts_i, parts_j, parts_s, n)
    s = rescore(vectors, i, j)
    keep = s >= threshold
    return i[keep], j[keep], s[keep]


def similar_pairs(
    vectors: np.ndarray,
    threshold: float,
    *,
    batch_size: int = 4096,
    exact: bool | None = None,
    index=None,
    nprobe: int | None = None,
    nlist: int | None = None,
    margin: float | None = None,
    seed: int = 0,
    timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of rows whose inner product is >= ``threshold``, with their float32 scores.

    Returns ``(i, j, scores)`` sorted by ``(i, j)``; ``i``/``j`` are int64 row positions. ``exact=None``
    searches exactly up to ``EXACT_MAX_N`` rows and with the on-the-fly inverted file (``nprobe`` lists per
    vector, ``nlist`` lists, default ``sqrt(nprobe * N)``) above. With ``index`` (any faiss index over the
    same rows in the same order; an ``IndexIDMap2``'s ids are mapped back to positions) its
    ``range_search`` at ``threshold - margin`` gives the candidates, which are then re-scored exactly.
    ``timings``, when given, receives the seconds spent in "index_build" and "search".
    """
    if timings is None:
        timings = {}
    vectors = _as_rows(vectors)
    n = vectors.shape[0]
    if n < 2:
        return _empty()
    if index is not None:
        return _index_pairs(vectors, threshold, batch_size, index, margin)
    if exact is None:
        exact = n <= EXACT_MAX_N
    if exact:
        start = time.perf_counter()
        out = _exact_pairs(vectors, threshold, batch_size)
        timings["index_build"] = 0.0
        timings["search"] = time.perf_counter() - start
        return out
    nprobe = nprobe or default_nprobe(vectors.shape[1])
    return _ivf_pairs(vectors, threshold, batch_size, nprobe, nlist, seed, timings)


def _pair_arrays(i, j) -> tuple[np.ndarray, np.ndarray]:
    i = np.asarray(i, dtype=np.int64).ravel()
    j = np.asarray(j, dtype=np.int64).ravel()
    if i.shape != j.shape:
        raise ValueError("i and j must have the same length")
    return i, j


def _split_sorted(members: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    if members.size == 0:
        return []
    cuts = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    return np.split(members, cuts)


def connected_groups(n: int, i: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
    """Connected components of size >= 2 of the pair graph on ``0..n-1``.

    Each group is sorted ascending and the list is sorted by first member, so the result depends only on
    the set of edges. Transitive: a chain A-B-C is one group even when A-C is far apart.
    """
    i, j = _pair_arrays(i, j)
    uf = UnionFind(n)
    uf.union_many(i, j)
    roots = uf.roots()
    sizes = np.bincount(roots, minlength=n)
    members = np.flatnonzero(sizes[roots] >= 2)
    labels = roots[members]
    order = np.argsort(labels, kind="stable")
    return _split_sorted(members[order], labels[order])


def _greedy_centres(m: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Centres of the sequential greedy pass over nodes ``0..m-1`` in id order (lower id first).

    ``u -> v`` are directed edges in both directions. Runs parallel rounds (a node whose id is below every
    undecided neighbour's is a centre; its neighbours are taken) while they make progress, then finishes
    the rest sequentially; both produce exactly the sequential result.
    """
    undecided = np.ones(m, dtype=bool)
    centre = np.zeros(m, dtype=bool)
    ids = np.arange(m)
    while u.size:
        lowest = np.full(m, m, dtype=np.int64)
        np.minimum.at(lowest, u, v)
        new = undecided & (ids < lowest)
        centre |= new
        undecided &= ~new
        undecided[v[new[u]]] = False
        keep = undecided[u] & undecided[v]
        before = u.size
        u, v = u[keep], v[keep]
        if u.size > 0.7 * before:
            break
    if u.size:
        order = np.argsort(u, kind="stable")
        u, v = u[order], v[order]
        ptr = np.searchsorted(u, ids, side="left")
        end = np.searchsorted(u, ids, side="right")
        for x in np.unique(u).tolist():
            if undecided[x]:
                centre[x] = True
                undecided[x] = False
                undecided[v[ptr[x] : end[x]]] = False
    centre |= undecided
    return centre


def star_groups(
    n: int,
    i: np.ndarray,
    j: np.ndarray,
    scores: np.ndarray | None,
    priority: np.ndarray,
    *,
    threshold: float | None = None,
) -> list[np.ndarray]:
    """Chain-proof groups: every member is a direct neighbour (score >= threshold) of its group's centre.

    Items are visited in priority order (lower ``priority`` first, ties by index); an item not yet in a
    group becomes a centre and takes every neighbour not yet in a group. Each returned array starts with
    its centre, then the members ascending; groups are listed in the order their centres were visited.
    ``threshold`` optionally drops pairs scored below it (``scores`` is only needed then).
    """
    i, j = _pair_arrays(i, j)
    priority = np.asarray(priority)
    if priority.shape != (n,):
        raise ValueError(f"priority must have shape ({n},)")
    if threshold is not None:
        keep = np.asarray(scores) >= threshold
        i, j = i[keep], j[keep]
    keep = i != j
    i, j = i[keep], j[keep]
    if i.size == 0:
        return []
    nodes = np.unique(np.concatenate((i, j)))
    nodes = nodes[np.lexsort((nodes, priority[nodes]))]
    m = nodes.size
    compact = np.empty(n, dtype=np.int64)
    compact[nodes] = np.arange(m)
    ci, cj = compact[i], compact[j]
    u, v = np.concatenate((ci, cj)), np.concatenate((cj, ci))

    centre = _greedy_centres(m, u, v)
    label = np.where(centre, np.arange(m), m)
    taken = centre[u] & ~centre[v]
    np.minimum.at(label, v[taken], u[taken])

    sizes = np.bincount(label, minlength=m)
    grouped = np.flatnonzero(sizes[label] >= 2)
    order = np.lexsort((nodes[grouped], ~centre[grouped], label[grouped]))
    grouped = grouped[order]
    return _split_sorted(nodes[grouped], label[grouped])


def group_min_scores(
    groups: Sequence[np.ndarray],
    i: np.ndarray,
    j: np.ndarray,
    scores: np.ndarray,
    *,
    centre_only: bool = False,
) -> list[float]:
    """Per group, the lowest score among the given pairs with both ends in the group (NaN if none).

    ``centre_only=True`` counts only pairs touching the group's first element, i.e. centre-to-member
    scores of ``star_groups``. Groups must be disjoint.
    """
    i, j = _pair_arrays(i, j)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not groups:
        return []
    sizes = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    members = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups])
    top = int(max(members.max(), i.max(initial=-1), j.max(initial=-1))) + 1
    gid = np.full(top, -1, dtype=np.int64)
    gid[members] = np.repeat(np.arange(len(groups)), sizes)
    gi, gj = gid[i], gid[j]
    inside = (gi >= 0) & (gi == gj)
    if centre_only:
        centres = members[np.concatenate(([0], np.cumsum(sizes)[:-1]))]
        c = centres[np.maximum(gi, 0)]
        inside &= (i == c) | (j == c)
    low = np.full(len(groups), np.inf)
    np.minimum.at(low, gi[inside], scores[inside])
    low[np.isinf(low)] = np.nan
    return low.tolist()
