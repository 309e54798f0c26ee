"""Tests for simsearch.dedup.graph against brute-force references on small planted data."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from simsearch.dedup import graph as dg

THRESHOLD = 0.9


def planted(n: int, dim: int, groups: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random unit vectors with planted groups: a centre plus 1..4 members at cosine 0.93..0.99."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sizes = rng.integers(2, 6, size=groups)
    rows = rng.choice(n, size=int(sizes.sum()), replace=False)
    out = np.split(rows, np.cumsum(sizes)[:-1])
    for g in out:
        c = v[g[0]]
        for m in g[1:]:
            noise = rng.standard_normal(dim).astype(np.float32)
            noise -= noise.dot(c) * c
            noise /= np.linalg.norm(noise)
            cos = rng.uniform(0.93, 0.99)
            x = cos * c + np.sqrt(1 - cos**2) * noise
            v[m] = x / np.linalg.norm(x)
    return v, out


def brute_pairs(v: np.ndarray, t: float) -> tuple[set, np.ndarray]:
    sims = v @ v.T
    i, j = np.nonzero(np.triu(sims >= t, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True)), sims


def borderline(sims: np.ndarray, t: float) -> set:
    i, j = np.nonzero(np.triu(np.abs(sims - t) < 1e-5, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def as_set(i: np.ndarray, j: np.ndarray) -> set:
    return set(zip(i.tolist(), j.tolist(), strict=True))


def reference_components(n: int, pairs: set) -> list[list[int]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for x in range(n):
        comps.setdefault(find(x), []).append(x)
    return sorted((c for c in comps.values() if len(c) > 1), key=lambda c: c[0])


def reference_star(n: int, pairs: set, priority: np.ndarray) -> list[list[int]]:
    nbrs: dict[int, set] = {}
    for a, b in pairs:
        nbrs.setdefault(a, set()).add(b)
        nbrs.setdefault(b, set()).add(a)
    assigned: set = set()
    groups = []
    for x in sorted(range(n), key=lambda k: (priority[k], k)):
        if x in assigned:
            continue
        assigned.add(x)
        taken = sorted(y for y in nbrs.get(x, ()) if y not in assigned)
        assigned.update(taken)
        if taken:
            groups.append([x, *taken])
    return groups


def as_lists(groups: list[np.ndarray]) -> list[list[int]]:
    return [g.tolist() for g in groups]


@pytest.mark.parametrize("n,dim,seed", [(500, 64, 0), (1500, 256, 1), (2000, 97, 2)])
def test_exact_pairs_match_brute_force(n: int, dim: int, seed: int) -> None:
    v, _ = planted(n, dim, 60, seed)
    truth, sims = brute_pairs(v, THRESHOLD)
    i, j, s = dg.similar_pairs(v, THRESHOLD, exact=True, batch_size=256)
    assert i.dtype == np.int64 and j.dtype == np.int64 and s.dtype == np.float32
    assert np.all(i < j)
    edge = borderline(sims, THRESHOLD)
    assert as_set(i, j) - edge == truth - edge
    assert len(truth) >= 60
    np.testing.assert_allclose(s, sims[i, j], atol=1e-5)
    order = np.lexsort((j, i))
    assert np.array_equal(order, np.arange(i.size))


@pytest.mark.parametrize("n,dim,seed", [(2000, 128, 3), (2000, 512, 4)])
def test_approximate_pairs_recall_and_exact_scores(n: int, dim: int, seed: int) -> None:
    v, groups = planted(n, dim, 150, seed)
    truth, sims = brute_pairs(v, THRESHOLD)
    timings: dict[str, float] = {}
    i, j, s = dg.similar_pairs(v, THRESHOLD, exact=False, timings=timings)
    found = as_set(i, j)
    planted_pairs = {(min(g[0], m), max(g[0], m)) for g in groups for m in g[1:]}
    assert len(found & planted_pairs) / len(planted_pairs) >= 0.99
    assert found <= truth | borderline(sims, THRESHOLD)
    np.testing.assert_allclose(s, sims[i, j], atol=1e-5)
    assert set(timings) == {"index_build", "search"}


def test_auto_mode_is_exact_for_small_n() -> None:
    v, _ = planted(800, 48, 40, 5)
    a = dg.similar_pairs(v, THRESHOLD)
    b = dg.similar_pairs(v, THRESHOLD, exact=True)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_index_with_ids_maps_back_to_positions() -> None:
    v, _ = planted(1200, 64, 50, 6)
    truth, sims = brute_pairs(v, THRESHOLD)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(v.shape[1]))
    ids = np.random.default_rng(0).permutation(10**6)[: len(v)].astype(np.int64)
    index.add_with_ids(v, ids)
    i, j, s = dg.similar_pairs(v, THRESHOLD, index=index, batch_size=300)
    edge = borderline(sims, THRESHOLD)
    assert as_set(i, j) - edge == truth - edge
    assert np.all(s >= THRESHOLD)


def test_memmap_input(tmp_path) -> None:
    v, _ = planted(600, 32, 30, 7)
    mm = np.memmap(tmp_path / "v.f32", dtype=np.float32, mode="w+", shape=v.shape)
    mm[:] = v
    mm.flush()
    ro = np.memmap(tmp_path / "v.f32", dtype=np.float32, mode="r", shape=v.shape)
    for exact in (True, False):
        a = dg.similar_pairs(ro, THRESHOLD, exact=exact)
        b = dg.similar_pairs(v, THRESHOLD, exact=exact)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_rejects_non_float32() -> None:
    with pytest.raises(TypeError):
        dg.similar_pairs(np.zeros((3, 4)), THRESHOLD)


def test_connected_groups_match_reference() -> None:
    v, _ = planted(1500, 64, 80, 8)
    i, j, _ = dg.similar_pairs(v, THRESHOLD, exact=True)
    got = as_lists(dg.connected_groups(len(v), i, j))
    assert got == reference_components(len(v), as_set(i, j))
    assert len(got) >= 70


def random_graph(n: int, edges: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, edges)
    b = rng.integers(0, n, edges)
    keep = a != b
    return np.minimum(a, b)[keep], np.maximum(a, b)[keep]


@pytest.mark.parametrize("seed", range(4))
def test_groups_on_random_graphs_match_reference(seed: int) -> None:
    n = 400
    i, j = random_graph(n, 300 + 100 * seed, seed)
    pairs = as_set(i, j)
    assert as_lists(dg.connected_groups(n, i, j)) == reference_components(n, pairs)
    priority = np.random.default_rng(seed).integers(0, 5, n)
    got = as_lists(dg.star_groups(n, i, j, None, priority))
    assert got == reference_star(n, pairs, priority)


def test_star_long_monotone_chain_uses_sequential_finish() -> None:
    n = 3000
    i = np.arange(n - 1)
    j = i + 1
    priority = np.arange(n)
    got = as_lists(dg.star_groups(n, i, j, None, priority))
    assert got == reference_star(n, as_set(i, j), priority)
    assert got[0] == [0, 1] and got[1] == [2, 3]
    assert as_lists(dg.connected_groups(n, i, j)) == [list(range(n))]


def test_star_groups_members_within_threshold_of_centre() -> None:
    v, _ = planted(1500, 64, 80, 9)
    i, j, s = dg.similar_pairs(v, THRESHOLD, exact=True)
    priority = np.random.default_rng(1).random(len(v))
    groups = dg.star_groups(len(v), i, j, s, priority)
    assert groups
    seen: set = set()
    for g in groups:
        assert len(g) >= 2
        assert list(g[1:]) == sorted(g[1:])
        assert np.all(v[g[1:]] @ v[g[0]] >= THRESHOLD - 1e-6)
        assert not seen & set(g.tolist())
        seen.update(g.tolist())
    assert as_lists(groups) == reference_star(len(v), as_set(i, j), priority)
    mins = dg.group_min_scores(groups, i, j, s, centre_only=True)
    expected = [float(np.min(v[g[1:]] @ v[g[0]])) for g in groups]
    np.testing.assert_allclose(mins, expected, atol=1e-5)


def test_chain_is_split_by_star_but_merged_by_connected() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(128)
    a /= np.linalg.norm(a)
    w = rng.standard_normal(128)
    w -= w.dot(a) * a
    w /= np.linalg.norm(w)
    angle = np.arccos(0.92)
    chain = [np.cos(k * angle) * a + np.sin(k * angle) * w for k in range(3)]
    noise = rng.standard_normal((20, 128))
    v = np.vstack([*chain, noise / np.linalg.norm(noise, axis=1, keepdims=True)]).astype(np.float32)
    i, j, s = dg.similar_pairs(v, THRESHOLD, exact=True)
    assert as_set(i, j) == {(0, 1), (1, 2)}
    assert float(v[0] @ v[2]) < THRESHOLD
    assert as_lists(dg.connected_groups(len(v), i, j)) == [[0, 1, 2]]
    assert as_lists(dg.star_groups(len(v), i, j, s, np.arange(len(v)))) == [[0, 1]]
    priority = np.zeros(len(v))
    priority[1] = -1
    assert as_lists(dg.star_groups(len(v), i, j, s, priority)) == [[1, 0, 2]]


def test_groups_invariant_to_pair_order_and_direction() -> None:
    v, _ = planted(1500, 64, 80, 10)
    n = len(v)
    i, j, s = dg.similar_pairs(v, THRESHOLD, exact=True)
    priority = np.random.default_rng(2).integers(0, 3, n)
    base_c = as_lists(dg.connected_groups(n, i, j))
    base_s = as_lists(dg.star_groups(n, i, j, s, priority))
    rng = np.random.default_rng(3)
    for _ in range(3):
        perm = rng.permutation(i.size)
        swap = rng.random(i.size) < 0.5
        pi, pj, ps = i[perm], j[perm], s[perm]
        pi, pj = np.where(swap[perm], pj, pi), np.where(swap[perm], pi, pj)
        assert as_lists(dg.connected_groups(n, pi, pj)) == base_c
        assert as_lists(dg.star_groups(n, pi, pj, ps, priority)) == base_s
        pi2, pj2 = np.concatenate((pi, pj)), np.concatenate((pj, pi))
        assert as_lists(dg.connected_groups(n, pi2, pj2)) == base_c


def test_star_threshold_filter() -> None:
    i = np.array([0, 1, 0])
    j = np.array([1, 2, 2])
    s = np.array([0.95, 0.95, 0.91], dtype=np.float32)
    assert as_lists(dg.star_groups(3, i, j, s, np.arange(3))) == [[0, 1, 2]]
    assert as_lists(dg.star_groups(3, i, j, s, np.arange(3), threshold=0.93)) == [[0, 1]]


def test_group_min_scores_all_pairs_and_missing() -> None:
    i = np.array([0, 1, 0, 5])
    j = np.array([1, 2, 2, 6])
    s = np.array([0.97, 0.92, 0.95, 0.99])
    groups = [np.array([0, 1, 2]), np.array([3, 4])]
    mins = dg.group_min_scores(groups, i, j, s)
    assert mins[0] == pytest.approx(0.92)
    assert np.isnan(mins[1])
    assert dg.group_min_scores(groups, i, j, s, centre_only=True)[0] == pytest.approx(0.95)
    assert dg.group_min_scores([], i, j, s) == []


def test_union_find_basic() -> None:
    uf = dg.UnionFind(10)
    assert len(uf) == 10
    assert uf.union(3, 7)
    assert not uf.union(7, 3)
    assert uf.union(7, 9)
    assert uf.connected(3, 9) and not uf.connected(3, 4)
    assert uf.find(9) == 3
    uf.union_many(np.array([0, 5, 8]), np.array([5, 8, 4]))
    roots = uf.roots()
    assert roots.tolist() == [0, 1, 2, 3, 0, 0, 6, 3, 0, 3]
    uf.union_many(np.array([9]), np.array([8]))
    assert uf.find(4) == 0 and uf.find(7) == 0
    uf.union_many(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    with pytest.raises(ValueError):
        uf.union_many(np.array([1, 2]), np.array([1]))


def test_union_many_matches_sequential_unions() -> None:
    n = 2000
    i, j = random_graph(n, 1500, 11)
    fast = dg.UnionFind(n)
    fast.union_many(i, j)
    slow = dg.UnionFind(n)
    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        slow.union(a, b)
    assert np.array_equal(fast.roots(), np.array([slow.find(x) for x in range(n)]))


def test_approximate_with_all_lists_probed_is_exact_even_in_small_blocks(monkeypatch) -> None:
    monkeypatch.setattr(dg, "_MAX_LIST_BLOCK", 100)
    v, _ = planted(2000, 64, 100, 12)
    truth, sims = brute_pairs(v, THRESHOLD)
    i, j, _ = dg.similar_pairs(v, THRESHOLD, exact=False, nlist=4, nprobe=4)
    edge = borderline(sims, THRESHOLD)
    assert as_set(i, j) - edge == truth - edge
