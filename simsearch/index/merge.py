"""Filling an IVF structure from shards: each shard's vectors are encoded into a copy of the trained, empty
structure by a Ray task, and the driver merges the shards' inverted lists (FAISS `merge_from`), as autofaiss does.

Training stays on the driver (it needs one sample of the whole collection); what is spread out is the assignment
of every vector to its list and its encoding (SQ8 or PQ codes), the part that grows with N. Used by
`simsearch index --ray` when the index type is an inverted file; `benchmarks/distributed.py --merge N` measures it
against the serial fill.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

SHARD_VECTORS = 65536


def is_ivf(index: Any) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except (RuntimeError, TypeError):
        return False


def _encode_shard(trained: np.ndarray, vectors: np.ndarray, ids: np.ndarray, threads: int) -> np.ndarray:
    """Runs on a worker: the trained empty structure with this shard added, serialised."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    index = faiss.deserialize_index(trained)
    index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
    return faiss.serialize_index(index)


def fill_with_ray(
    ray: Any,
    index: Any,
    read: Callable[[np.ndarray], np.ndarray],
    ids: np.ndarray,
    workers: int,
    shard: int = SHARD_VECTORS,
) -> dict[str, float]:
    """Add the vectors of `ids` (`read(ids)` gives them) to the trained IVF `index` through Ray tasks, at most
    `workers` at a time, merging each shard's lists as it comes back. Returns timings (seconds)."""
    import time

    import faiss

    t0 = time.perf_counter()
    trained = ray.put(faiss.serialize_index(index))
    cpus = ray.cluster_resources().get("CPU", 1)
    threads = max(1, int(cpus // max(1, workers)))
    task = ray.remote(num_cpus=threads)(_encode_shard)
    pending: list[Any] = []
    merge_s = 0.0
    starts = list(range(0, len(ids), shard))

    def merge(ref: Any) -> None:
        nonlocal merge_s
        sub = faiss.deserialize_index(ray.get(ref))
        t = time.perf_counter()
        index.merge_from(sub, 0)
        merge_s += time.perf_counter() - t

    for a in starts:
        part = ids[a : a + shard]
        pending.append(task.remote(trained, read(part), part, threads))
        while len(pending) >= max(1, workers) + 1:  # keep every worker busy, bound what waits in the object store
            ready, pending = ray.wait(pending, num_returns=1)
            merge(ready[0])
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        merge(ready[0])
    return {"fill_s": round(time.perf_counter() - t0, 3), "merge_s": round(merge_s, 3), "shards": len(starts)}
