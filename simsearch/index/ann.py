"""Search structures over the stored vectors: which FAISS index type, how it is built, and how it is tuned.

The vectors themselves live once, in the store's memory-mapped float32 file; a search structure holds only what it
needs to find candidates (compressed codes or a graph), and every candidate is re-scored exactly from the stored
vectors, so reported scores are true cosines whatever the type.

Types (`--index-type`):
- `flat`: no structure; exact inner products over the memory-mapped vectors (FAISS brute-force kernels).
- `hnsw`: an HNSW graph (32 links) over 8-bit scalar-quantised codes; cannot remove, so removals rebuild it.
- `ivf`: an inverted file (about 2 sqrt(N) lists) over 8-bit scalar-quantised codes (dim bytes per vector).
- `ivfpq`: an inverted file over 4-bit fast-scan product-quantised codes (dim/20 bytes per vector, 64 at 1280):
  for very large collections (8-bit PQ trains 40x slower here for the same recall after re-scoring).
- any other string is a FAISS factory string (wrapped in an id map when it needs one).
- `auto` (default): flat below `FLAT_MAX` vectors, then `ivf`; `ivfpq` when `ivf` codes exceed the memory budget
  or the collection exceeds `IVFPQ_MIN`. Re-chosen at each save, so a growing collection switches type.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInputError

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
FLAT_MAX = 50_000  # exact search over 50k x 1280 float32 takes ~8 ms on 2 cores: below this an ANN buys nothing
IVFPQ_MIN = 4_000_000  # ivf codes of 4M x 1280 would be 5 GB; beyond, PQ codes (64 bytes) keep memory small
TARGET_RECALL = 0.95
TUNE_QUERIES = 200
RETRAIN_GROWTH = 4.0  # an IVF trained on N vectors is retrained once the collection passes 4 N


@dataclass(frozen=True)
class IndexPlan:
    """What structure to build: the user-facing kind and the FAISS factory string for `dim`."""

    kind: str
    factory: str | None  # None for flat
    nlist: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "factory": self.factory, "nlist": self.nlist}


def _nlist(n: int) -> int:
    """About 2 sqrt(N) lists (a power of two, at least 39 training points each): 2048 at 1M vectors."""
    want = 2 ** round(math.log2(max(16.0, 2 * math.sqrt(max(n, 1)))))
    cap = 2 ** int(math.log2(max(16, n // 39)))
    return int(max(16, min(want, cap, 65536)))


def parse_budget(text: str | None) -> int | None:
    """'2GB', '500M', '1.5GiB' or a byte count -> bytes (None stays None)."""
    if text is None or str(text).strip() == "":
        return None
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise BadInputError(f"cannot read memory budget {text!r}; use e.g. 2GB or 500MB")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def plan_for(requested: str, n: int, dim: int, memory_budget: int | None = None) -> IndexPlan:
    """The structure for `n` vectors of `dim` under `requested` (a kind, `auto`, or a FAISS factory string)."""
    kind = requested
    if requested == "auto":
        if n < FLAT_MAX:
            kind = "flat"
        else:
            sq_bytes = n * (dim + 8)
            kind = "ivfpq" if n >= IVFPQ_MIN or (memory_budget is not None and sq_bytes > memory_budget) else "ivf"
    if kind == "flat":
        return IndexPlan("flat", None)
    nlist = _nlist(n)
    if kind == "ivf":
        return IndexPlan("ivf", f"IVF{nlist},SQ8", nlist)
    if kind == "ivfpq":
        m = _pq_m(dim)
        return IndexPlan("ivfpq", f"IVF{nlist},PQ{m}x4fs", nlist)
    if kind == "hnsw":
        return IndexPlan("hnsw", "HNSW32,SQ8")
    if requested in INDEX_TYPES:
        raise AssertionError(requested)
    return IndexPlan("factory", requested, _factory_nlist(requested))


def _pq_m(dim: int) -> int:
    """4-bit PQ sub-quantisers: about dim/10 (128 for 1280, 64 bytes), an even divisor of dim."""
    want = max(4, dim // 10)
    for m in sorted(range(2, dim + 1, 2), key=lambda x: abs(x - want)):
        if dim % m == 0:
            return m
    return 2


def _factory_nlist(factory: str) -> int:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 0


def check_factory(factory: str, dim: int) -> None:
    """A clear error for a factory string FAISS cannot build."""
    import faiss

    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"FAISS cannot build index type {factory!r}: {first[:200]}") from None


def needs_rebuild(plan: IndexPlan, built: dict[str, Any] | None, n: int) -> bool:
    """Whether the structure on disk (`built`, from the manifest) no longer fits the plan for `n` vectors."""
    if built is None or built.get("kind") != plan.kind or built.get("factory") != plan.factory:
        return plan.kind != "flat" or (built is not None and built.get("kind") != "flat")
    trained = int(built.get("trained_on", 0))
    return plan.kind in ("ivf", "ivfpq", "factory") and trained > 0 and n > RETRAIN_GROWTH * trained


def build(plan: IndexPlan, dim: int, sample: np.ndarray) -> Any:
    """An empty, trained FAISS structure (ids are the store's image ids)."""
    import faiss

    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        if plan.nlist and len(sample) < plan.nlist:
            raise BadInputError(f"{plan.factory} needs at least {plan.nlist} vectors to train; have {len(sample)}")
        index.train(np.ascontiguousarray(sample, np.float32))
    try:
        index.add_with_ids(np.zeros((0, dim), np.float32), np.zeros(0, np.int64))
    except RuntimeError:  # HNSW and other flat-storage types have no ids of their own
        index = faiss.IndexIDMap2(index)
    return index


def min_vectors(plan: IndexPlan) -> int:
    """Below this many vectors a structure cannot be trained well: the index stays exact (flat) until then."""
    if plan.kind == "flat":
        return 0
    if plan.kind == "ivfpq":
        return max(4 * plan.nlist, 2048)  # 256 centroids per PQ sub-quantiser need a few thousand points
    if plan.kind == "hnsw":
        return 2
    if plan.kind == "factory":
        return max(2 * plan.nlist, 2)  # the user chose it: built as soon as it can be trained at all
    return max(4 * plan.nlist, 16)


def training_sample_size(plan: IndexPlan) -> int:
    if plan.kind == "hnsw":
        return 10_000
    return int(min(max(64 * plan.nlist, 20_000), 200_000)) if plan.nlist else 50_000


def _inner(index: Any) -> Any:
    import faiss

    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else faiss.downcast_index(index)


def param_name(index: Any) -> str | None:
    import faiss

    inner = _inner(index)
    if isinstance(inner, faiss.IndexIVF):
        return "nprobe"
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch"
    return None


def set_param(index: Any, value: int | None) -> None:
    import faiss

    name = param_name(index)
    if name is not None and value:
        faiss.ParameterSpace().set_index_parameter(index, name, int(value))


def search_params(index: Any, value: int | None) -> Any:
    """FAISS SearchParameters carrying nprobe or efSearch (`param_name`) for one search; None without a value or
    for a structure that has no such parameter. Passing them leaves the shared structure untouched, so concurrent
    searches need no lock and no set-and-restore."""
    import faiss

    if not value:
        return None
    inner = _inner(index)
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=int(value))
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=int(value))
    return None


def wider_params(index: Any, value: int | None) -> Any:
    """SearchParameters that look 8 times further than `value` (or the structure's own setting), for queries whose
    first search found fewer than k rows (an IVF query near small lists); None when nothing wider exists."""
    inner = _inner(index)
    name = param_name(index)
    if name == "nprobe":
        now = int(value or inner.nprobe)
        wider = min(int(inner.nlist), max(8 * now, 16))
    elif name == "efSearch":
        now = int(value or inner.hnsw.efSearch)
        wider = min(4096, max(8 * now, 128))
    else:
        return None
    return search_params(index, wider) if wider > now else None


def candidates(k: int, index: Any = None, kind: str | None = None) -> int:
    """How many candidates a structure returns for re-scoring to a final k: few for fine codes, more for coarse
    ones. `kind`: `codes(index)`, when the caller already knows it."""
    kind = kind or codes(index)
    if kind == "coarse":
        return max(10 * k, k + 100)
    if kind == "fine":
        # fine codes rank well: at 1M (IVF2048,SQ8, nprobe 2) 15 candidates for k=10 give recall@10 0.986, as 40 do,
        # and 10 give 0.967; each candidate is one more row read from the vector file
        return k + max(5, k // 2)
    return max(4 * k, k + 30)


def codes(index: Any) -> str:
    """How precisely a structure's own scores rank: "fine" (exact vectors, 8-bit or float16 scalar codes),
    "coarse" (product quantisation), or "other" (anything else a factory string builds: PCA, OPQ, 4-bit codes...)."""
    import faiss

    if index is None:
        return "other"
    inner = _inner(index)
    if isinstance(inner, faiss.IndexPreTransform):  # PCA, OPQ...: lossy before the codes, never "fine"
        wrapped = codes(faiss.downcast_index(inner.index))
        return "coarse" if wrapped == "coarse" else "other"
    if isinstance(inner, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan, faiss.IndexHNSWPQ, faiss.IndexPQ)):
        return "coarse"
    if isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexHNSWFlat)):
        return "fine"
    fine_sq = (faiss.ScalarQuantizer.QT_8bit, faiss.ScalarQuantizer.QT_8bit_uniform, faiss.ScalarQuantizer.QT_fp16)
    if isinstance(inner, faiss.IndexIVFScalarQuantizer) and inner.sq.qtype in fine_sq:
        return "fine"
    if isinstance(inner, faiss.IndexHNSWSQ):
        storage = faiss.downcast_index(inner.storage)
        if isinstance(storage, faiss.IndexScalarQuantizer) and storage.sq.qtype in fine_sq:
            return "fine"
    return "other"


def tune(
    index: Any, queries: np.ndarray, truth: list[set[int]], rescore: Any, k: int = 10, exclude: Any = None
) -> dict[str, Any]:
    """The smallest search parameter whose recall@k (after exact re-scoring) reaches TARGET_RECALL on `queries`.

    `exclude[i]`: an id left out of query i's results (the query's own entry when queries are stored vectors).
    """
    name = param_name(index)
    if name is None:
        return {"param": None, "value": None, "recall_at_10": None}
    values = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    if name == "nprobe":
        nlist = _inner(index).nlist
        values = [v for v in values if v <= nlist] or [nlist]
    else:
        values = [v for v in values if v >= 16]
    best = (values[-1], 0.0)
    for v in values:
        set_param(index, v)
        _, ids = index.search(np.ascontiguousarray(queries, np.float32), candidates(k + 1, index))
        got = rescore(queries, ids, k + 1)
        found = [set(got[i].tolist()) - ({int(exclude[i])} if exclude is not None else set()) for i in range(len(got))]
        recall = float(np.mean([len(truth[i] & found[i]) / max(1, len(truth[i])) for i in range(len(queries))]))
        best = (v, recall)
        if recall >= TARGET_RECALL:
            break
    set_param(index, best[0])
    return {"param": name, "value": int(best[0]), "recall_at_10": round(best[1], 4)}
