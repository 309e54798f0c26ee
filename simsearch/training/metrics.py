"""Retrieval metrics of an embedding on labelled images: all-vs-all, same label = relevant, the query excluded.

- mAP: mean over queries of average precision over the whole ranking;
- P@1: the nearest other image has the query's label;
- recall@k: at least one image of the query's label is among the k nearest (the metric-learning convention);
- the cosine threshold at which "same label" pairs reach a target precision, and the recall it keeps.

Computed in row blocks with numpy (memory O(block x N)), never a Python loop over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

_EXACT_PAIRS = 25_000_000  # up to this many pairs the threshold is exact; beyond, a 1e-4 histogram


@dataclass
class RetrievalMetrics:
    images: int
    labels: int
    queries: int
    map: float
    p_at_1: float
    recall_at: dict[int, float] = field(default_factory=dict)
    threshold: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "labels": self.labels,
            "map": round(self.map, 6),
            "p_at_1": round(self.p_at_1, 6),
            "recall_at": {str(k): round(v, 6) for k, v in self.recall_at.items()},
            "threshold": self.threshold,
        }


def retrieval_metrics(
    vectors: np.ndarray,
    labels: np.ndarray | list[Any],
    ks: tuple[int, ...] = (1, 5, 10),
    target_precision: float | None = 0.99,
    block: int = 512,
) -> RetrievalMetrics:
    """Metrics of L2-normalised `vectors` (n, d) with one label each; queries without a same-label partner skip."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    _, lab = np.unique(np.asarray(labels), return_inverse=True)
    lab = lab.astype(np.int64)
    n = len(x)
    if n < 2:
        raise ValueError("need at least 2 images to evaluate retrieval")
    counts = np.bincount(lab)
    ap_sum = p1_sum = 0.0
    rec = dict.fromkeys(ks, 0.0)
    queries = 0
    ranks = np.arange(1, n, dtype=np.float64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = x[start:stop] @ x.T
        rows = np.arange(stop - start)
        s[rows, start + rows] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")[:, : n - 1]  # the query itself sorts last
        rel = lab[order] == lab[start:stop, None]
        r = counts[lab[start:stop]] - 1
        ok = r > 0
        if not ok.any():
            continue
        rel, r = rel[ok], r[ok]
        hits = np.cumsum(rel, axis=1)
        ap_sum += float((np.sum((hits / ranks) * rel, axis=1) / r).sum())
        p1_sum += float(rel[:, 0].sum())
        for k in ks:
            rec[k] += float(rel[:, :k].any(axis=1).sum())
        queries += int(ok.sum())
    if queries == 0:
        raise ValueError("no label has two images: retrieval metrics are undefined")
    thr: dict[str, float | None] = {}
    if target_precision is not None:
        value, recall = threshold_at_precision(x, lab, target_precision, block)
        thr = {"target_precision": target_precision, "value": value, "recall": recall}
    return RetrievalMetrics(n, int((counts > 0).sum()), queries, ap_sum / queries, p1_sum / queries,
                            {k: v / queries for k, v in rec.items()}, thr)  # fmt: skip


def threshold_at_precision(
    x: np.ndarray, lab: np.ndarray, target: float, block: int = 512
) -> tuple[float | None, float]:
    """The lowest cosine t such that pairs scoring >= t are same-label with precision >= target, and their recall.

    Over all unordered pairs. Exact up to `_EXACT_PAIRS` pairs; above, on a histogram of 1e-4 wide bins (t is then
    a bin's lower edge). (None, 0.0) when no threshold reaches the target.
    """
    n = len(x)
    n_pairs = n * (n - 1) // 2
    exact = n_pairs <= _EXACT_PAIRS
    scores, same = [], []
    bins = 20_000
    pos_h = np.zeros(bins + 1, np.int64)
    neg_h = np.zeros(bins + 1, np.int64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = x[start:stop] @ x.T
        i, j = np.triu_indices(stop - start, k=1, m=n - start)
        sv = s[i, j + start]
        same_v = lab[start + i] == lab[start + j]
        if exact:
            scores.append(sv)
            same.append(same_v)
        else:
            b = np.clip(((sv + 1.0) * (bins / 2)).astype(np.int64), 0, bins)
            pos_h += np.bincount(b[same_v], minlength=bins + 1)
            neg_h += np.bincount(b[~same_v], minlength=bins + 1)
    if exact:
        sv = np.concatenate(scores)
        same_v = np.concatenate(same)
        total_pos = int(same_v.sum())
        if total_pos == 0:
            return None, 0.0
        order = np.argsort(-sv, kind="stable")
        sv, same_v = sv[order], same_v[order]
        tp = np.cumsum(same_v)
        # only cut between distinct scores: tied pairs are all in or all out
        last = np.r_[sv[1:] != sv[:-1], True]
        cut_tp, cut_n, cut_s = tp[last], np.flatnonzero(last) + 1, sv[last]
    else:
        total_pos = int(pos_h.sum())
        if total_pos == 0:
            return None, 0.0
        tp_desc = np.cumsum(pos_h[::-1])
        n_desc = np.cumsum((pos_h + neg_h)[::-1])
        nonempty = (pos_h + neg_h)[::-1] > 0
        cut_tp, cut_n = tp_desc[nonempty], n_desc[nonempty]
        cut_s = (np.arange(bins, -1, -1)[nonempty] / (bins / 2) - 1.0).astype(np.float64)
    precision = cut_tp / cut_n
    good = np.flatnonzero(precision >= target)
    if len(good) == 0:
        return None, 0.0
    k = good[-1]
    return round(float(cut_s[k]), 6), round(float(cut_tp[k] / total_pos), 6)
