"""Scale benchmark for near-duplicate grouping (simsearch.dedup.graph) on synthetic embeddings.

Generates N random unit vectors chunkwise (float32) with planted duplicate groups (a centre plus 1..4
members at cosine ~U(min_cos, max_cos) to it), finds similar pairs, groups them and checks that every
planted group lands inside one found group. Prints a line per phase and one final JSON line.

    python benchmarks/dedup_scale.py --n 1000000 --dim 1280 --threshold 0.9 --groups 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simsearch.dedup import graph as dg  # noqa: E402


def make_vectors(n: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """N random unit vectors, generated chunk by chunk so only one float32 copy is ever held."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - a), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[a : a + block.shape[0]] = block
    return out


def plant_groups(vectors: np.ndarray, groups: int, seed: int, min_cos: float, max_cos: float) -> list[np.ndarray]:
    """Overwrite random rows with duplicate groups of size 2..5; returns each group's rows (centre first)."""
    rng = np.random.default_rng(seed + 1)
    n, dim = vectors.shape
    sizes = rng.integers(2, 6, size=groups)
    rows = rng.choice(n, size=int(sizes.sum()), replace=False)
    planted = np.split(rows, np.cumsum(sizes)[:-1])
    centres = np.concatenate([np.repeat(g[0], len(g) - 1) for g in planted])
    members = np.concatenate([g[1:] for g in planted])
    c = vectors[centres]
    noise = rng.standard_normal(c.shape, dtype=np.float32)
    noise -= np.einsum("ij,ij->i", noise, c)[:, None] * c
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = rng.uniform(min_cos, max_cos, size=(len(members), 1)).astype(np.float32)
    dup = cos * c + np.sqrt(1.0 - cos**2) * noise
    vectors[members] = dup / np.linalg.norm(dup, axis=1, keepdims=True)
    return planted


def score_groups(n: int, found: list[np.ndarray], planted: list[np.ndarray]) -> tuple[int, int]:
    """(planted groups fully inside one found group, found groups not inside a single planted group)."""
    found_id = np.full(n, -1, dtype=np.int64)
    for k, g in enumerate(found):
        found_id[g] = k
    planted_id = np.full(n, -1, dtype=np.int64)
    for k, g in enumerate(planted):
        planted_id[g] = k
    recovered = sum(1 for g in planted if found_id[g[0]] >= 0 and np.all(found_id[g] == found_id[g[0]]))
    spurious = sum(1 for g in found if planted_id[g[0]] < 0 or np.any(planted_id[g] != planted_id[g[0]]))
    return recovered, spurious


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--groups", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-cos", type=float, default=0.93)
    p.add_argument("--max-cos", type=float, default=0.99)
    p.add_argument("--exact", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--nprobe", type=int, default=None, help="default: 64 below 512 dimensions, else 32")
    p.add_argument("--nlist", type=int, default=None)
    args = p.parse_args(argv)
    exact = {"auto": None, "yes": True, "no": False}[args.exact]
    if exact is None:
        exact = args.n <= dg.EXACT_MAX_N

    res: dict = {
        "n": args.n,
        "dim": args.dim,
        "threshold": args.threshold,
        "planted_groups": args.groups,
        "mode": "exact" if exact else f"ivf nprobe={args.nprobe or dg.default_nprobe(args.dim)}",
        "threads": faiss.omp_get_max_threads(),
    }
    t0 = time.perf_counter()
    vectors = make_vectors(args.n, args.dim, args.seed)
    planted = plant_groups(vectors, args.groups, args.seed, args.min_cos, args.max_cos)
    res["generate_s"] = time.perf_counter() - t0
    print(f"generate: {res['generate_s']:.1f} s ({args.n} x {args.dim}, {args.groups} planted groups)")

    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    i, j, s = dg.similar_pairs(
        vectors, args.threshold, exact=exact, nprobe=args.nprobe, nlist=args.nlist, timings=phases
    )
    res["pairs_s"] = time.perf_counter() - t0
    res["index_build_s"] = phases.get("index_build", 0.0)
    res["search_s"] = phases.get("search", res["pairs_s"])
    res["pairs"] = int(i.size)
    print(f"index build: {res['index_build_s']:.1f} s")
    print(f"search: {res['search_s']:.1f} s, {res['pairs']} pairs")

    t0 = time.perf_counter()
    groups = dg.connected_groups(args.n, i, j)
    res["grouping_s"] = time.perf_counter() - t0
    res["groups"] = len(groups)
    res["recovered"], res["spurious"] = score_groups(args.n, groups, planted)
    print(
        f"grouping (connected): {res['grouping_s']:.2f} s, {res['groups']} groups, "
        f"recovered {res['recovered']}/{args.groups} planted, {res['spurious']} spurious"
    )

    t0 = time.perf_counter()
    priority = np.arange(args.n)
    stars = dg.star_groups(args.n, i, j, s, priority)
    res["star_grouping_s"] = time.perf_counter() - t0
    res["star_groups"] = len(stars)
    mins = dg.group_min_scores(stars, i, j, s, centre_only=True)
    res["star_min_centre_score"] = float(np.nanmin(mins)) if mins else None
    print(
        f"grouping (star): {res['star_grouping_s']:.2f} s, {res['star_groups']} groups, "
        f"min centre-member score {res['star_min_centre_score']}"
    )
    res["total_s"] = res["generate_s"] + res["pairs_s"] + res["grouping_s"]
    res["peak_rss_gib"] = peak_rss_gib()
    print(f"total: {res['total_s']:.1f} s, peak RSS {res['peak_rss_gib']:.2f} GiB")
    print(json.dumps(res, sort_keys=True))
    return res


if __name__ == "__main__":
    main()
