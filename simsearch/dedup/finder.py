"""Duplicate groups from an index: exact copies (same sha256) and near duplicates (cosine >= threshold).

Exact copies collapse to one representative each (the one the keep rules prefer); near-duplicate search then runs
over the representatives only, with FAISS-sized memory (no N x N matrix) and union-find or star grouping. So every
file that could go is counted once: `duplicates` = sum over groups of (size - 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..index.store import IndexStore, Row
from ..index.videos import video_shas
from ..media.raw import RAW_SUFFIXES
from .videos import video_groups

DEFAULT_THRESHOLD = 0.90  # cosine alone (--no-verify, or an explicit --threshold): best F1 on clothing + edits
AUTO_THRESHOLD = 0.86  # the default: candidates from here are confirmed geometrically (benchmarks/dedup_peer.py)
AUTO_THRESHOLDS = {"rmac": 0.88}  # by pooling: R-MAC scores copies higher (group recall 0.998 at 0.88 vs 0.987)
ACCEPT_ABOVE = 0.95  # the default: pairs at or above are copies without a check (3 of 7,500 on clothing are re-shots)
VERIFY_THRESHOLD = 0.80  # candidates for --verify, which checks every pair
GROUP_MODES = ("connected", "star")
KEEP_RULES = ("resolution", "size", "oldest", "newest", "shortest-path", "longest-path", "prefer-raw", "prefer-jpeg")
DEFAULT_KEEP = ("resolution", "size", "oldest", "shortest-path")


@dataclass
class DupGroup:
    """A group of duplicates; `files[0]` is the one the keep rules keep."""

    kind: str  # "exact" or "near"
    files: list[str]
    min_score: float
    ids: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # similarity of each file to files[0]

    @property
    def keep(self) -> str:
        return self.files[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "files": self.files,
            "min_score": round(float(self.min_score), 6),
            "keep": self.keep,
            "scores": [round(float(s), 6) for s in self.scores],
        }


@dataclass
class DedupReport:
    threshold: float
    groups: list[DupGroup]
    group_mode: str = "connected"
    keep_rules: tuple[str, ...] = DEFAULT_KEEP
    verified: dict[str, Any] | None = None  # geometric confirmation: pairs checked, confirmed, dropped

    @property
    def duplicates(self) -> int:
        return sum(len(g.files) - 1 for g in self.groups)

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "groups": [g.to_json() for g in self.groups],
            "duplicates": self.duplicates,
            "group": self.group_mode,
            "keep": list(self.keep_rules),
            **({"verified": self.verified} if self.verified is not None else {}),
        }


def auto_threshold(store: IndexStore) -> float:
    """Where the default's geometrically confirmed band starts, for this index's pooling."""
    return AUTO_THRESHOLDS.get(str(store.signature.get("pooling")), AUTO_THRESHOLD)


def parse_keep(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    if spec is None:
        return DEFAULT_KEEP
    rules = tuple(r.strip() for r in (spec.split(",") if isinstance(spec, str) else spec) if r.strip())
    bad = [r for r in rules if r not in KEEP_RULES]
    if bad:
        raise BadInputError(f"unknown keep rule {bad[0]!r}; choose from {', '.join(KEEP_RULES)}")
    return rules


def keep_key(row: Row, rules: Sequence[str], prefer: Sequence[str] = ()) -> tuple:
    """Sort key: smaller is better to keep. Files under a --prefer folder always come first."""
    key: list[Any] = [0 if is_preferred(row.path, prefer) else 1]
    for r in rules:
        if r == "resolution":
            key.append(-((row.width or 0) * (row.height or 0)))
        elif r == "size":
            key.append(-row.size)
        elif r == "oldest":
            key.append(row.mtime_ns)
        elif r == "newest":
            key.append(-row.mtime_ns)
        elif r == "shortest-path":
            key.append(len(row.path))
        elif r == "longest-path":
            key.append(-len(row.path))
        elif r in ("prefer-raw", "prefer-jpeg"):  # a camera's RAW and its JPEG of the same shot: which one stays
            raw = os.path.splitext(row.path)[1].lower() in RAW_SUFFIXES
            key.append(0 if raw == (r == "prefer-raw") else 1)
    key.append(row.path)
    return tuple(key)


def is_preferred(path: str, prefer: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in prefer)


def find_duplicates(
    store: IndexStore,
    threshold: float | None = None,
    group: str = "connected",
    keep: str | Sequence[str] | None = None,
    prefer: Sequence[str] = (),
    near: bool = True,
    rotations: Any = None,
    progress: Callable[[str], None] | None = None,
    verify: bool | None = None,
    accept_above: float | None = None,
    verify_progress: Callable[[int, int], None] | None = None,
) -> DedupReport:
    """Group the index's files into exact and near-duplicate groups, kept file first in each.

    `rotations`: an Embedder; when given, copies rotated by 90/180/270 degrees or mirrored are matched too (each
    representative file is decoded once more and embedded four times). `progress` is told each stage's name.
    Near duplicates, by default (`threshold` and `verify` None): pairs from AUTO_THRESHOLD up are confirmed
    geometrically (local features, RANSAC, then the warped images must agree) and look-alikes dropped; pairs at
    ACCEPT_ABOVE or more are kept unchecked, and a pair whose file cannot be read falls back to the cosine rule.
    An explicit `threshold` alone, or `verify=False`, is cosine only (DEFAULT_THRESHOLD); `verify=True` checks
    every pair from `threshold` (VERIFY_THRESHOLD) up. Pairs scoring `accept_above` or more are never checked.
    """
    auto = verify is None and threshold is None
    if auto:
        threshold, verify = auto_threshold(store), True
        accept_above = ACCEPT_ABOVE if accept_above is None else accept_above
    elif threshold is None:
        threshold = VERIFY_THRESHOLD if verify else DEFAULT_THRESHOLD
    stage = progress or (lambda _text: None)
    from .graph import connected_groups, group_min_scores, similar_pairs, star_groups

    if group not in GROUP_MODES:
        raise BadInputError(f"unknown group mode {group!r}; choose {' or '.join(GROUP_MODES)}")
    if not -1.0 <= threshold <= 1.0:
        raise BadInputError("threshold must be between -1 and 1")
    rules = parse_keep(keep)
    prefer = [os.path.abspath(os.path.expanduser(p)) for p in prefer]
    stage("reading the index")
    rows = store.all_rows()
    if not rows:
        return DedupReport(threshold, [], group, rules)
    ranked = sorted(rows, key=lambda r: keep_key(r, rules, prefer))
    by_sha: dict[str, list[Row]] = {}
    for r in ranked:
        by_sha.setdefault(r.sha256, []).append(r)
    groups = [
        DupGroup("exact", [r.path for r in members], 1.0, [r.id for r in members], [1.0] * len(members))
        for members in by_sha.values()
        if len(members) > 1
    ]
    verified = None
    if near:
        reps = [members[0] for members in by_sha.values()]  # in keep order: position = priority
        shas = video_shas(store)
        if shas:  # videos pair by aligned frames, never by their whole-video vector, and never with photos
            stage("aligning videos")
            for members, scores in video_groups(store, [r for r in reps if r.sha256 in shas]):
                groups.append(DupGroup("near", [m.path for m in members], float(min(scores)), [m.id for m in members],
                                       scores))  # fmt: skip
            reps = [r for r in reps if r.sha256 not in shas]
        n = len(reps)
        stage(f"similar pairs among {len(reps)} images")
        if n >= SLOT_ORDER_MIN and rotations is None and threshold > 0:
            vecs = None
            i, j, s = _pairs_in_slot_order(store, np.array([r.id for r in reps], np.int64), threshold)
        else:
            vecs = store.vectors([r.id for r in reps])
            i, j, s = similar_pairs(vecs, threshold)
        if rotations is not None:
            stage("rotated and mirrored copies")
            i, j, s = _merge_pairs(i, j, s, *_rotation_pairs(rotations, [r.path for r in reps], vecs, threshold))
        if verify and len(i):
            from .graph import UnionFind
            from .verify import verify_pairs

            check = np.ones(len(i), bool) if accept_above is None else s < accept_above
            joined = None
            if group == "connected":
                joined = UnionFind(n)
                joined.union_many(i[~check], j[~check])
            stage(f"verifying up to {int(check.sum())} pairs geometrically")
            picked = np.flatnonzero(check)
            verdicts = verify_pairs(store.path, reps, i[picked], j[picked], s[picked], joined, verify_progress)
            kept = verdicts.keep.copy()
            if auto:  # no verdict (unreadable, or too few keypoints to tell): judged by cosine, as without verification
                kept |= verdicts.no_verdict & (s[picked] >= DEFAULT_THRESHOLD)
            keep_pair = ~check
            keep_pair[picked] = kept
            verified = {"pairs": len(picked), "checked": verdicts.checked,
                        "confirmed": int((verdicts.keep & (verdicts.inliers >= 0)).sum()),
                        "implied": int((verdicts.inliers < 0).sum()),
                        "dropped": int((~kept).sum()), "no_verdict": int(verdicts.no_verdict.sum()),
                        "accepted_unchecked": int((~check).sum()), "accept_above": accept_above}  # fmt: skip
            i, j, s = i[keep_pair], j[keep_pair], s[keep_pair]
        stage(f"grouping {len(i)} pairs")
        if group == "star":
            found = star_groups(n, i, j, s, np.arange(n))
            mins = group_min_scores(found, i, j, s, centre_only=True)
        else:
            found = [np.sort(g) for g in connected_groups(n, i, j)]
            mins = group_min_scores(found, i, j, s)
        for g, low in zip(found, mins, strict=True):
            members = [reps[int(x)] for x in g]
            members.sort(key=lambda r: keep_key(r, rules, prefer))
            ids = [m.id for m in members]
            v = store.vectors(ids)
            groups.append(DupGroup("near", [m.path for m in members], float(low), ids,
                                   [float(min(1.0, x)) for x in v @ v[0]]))  # fmt: skip
    groups.sort(key=lambda g: (g.kind != "exact", g.files[0]))
    return DedupReport(threshold, groups, group, rules, verified)


def explain_pair(
    idx: Any, a: Any, b: Any, threshold: float | None = None, verify: bool | None = None
) -> tuple[str, dict[str, Any]]:
    """The cosine score of two files and why they are or are not near duplicates under find_duplicates' rules
    (same `threshold` and `verify` meaning), with the geometric check's inliers when one applies."""
    auto = verify is None and threshold is None
    accept = ACCEPT_ABOVE if auto else None
    if auto:
        threshold, verify = auto_threshold(idx.store), True
    elif threshold is None:
        threshold = VERIFY_THRESHOLD if verify else DEFAULT_THRESHOLD
    va, vb = idx.vector_for(a), idx.vector_for(b)
    score = float(min(1.0, np.dot(va, vb)))
    pa, pb = (os.path.abspath(os.path.expanduser(str(x))) for x in (a, b))
    ra, rb = idx.store.row_by_path(pa), idx.store.row_by_path(pb)
    same = bool(ra and rb and ra.sha256 == rb.sha256)
    inliers = copy = None
    if same:
        why, grouped = "byte-identical files (same sha256): an exact group", True
    elif score < threshold:
        why, grouped = (
            f"score {score:.4f} < threshold {threshold}: not grouped (lower --threshold to group them)",
            False,
        )
    elif not verify:
        why, grouped = f"score {score:.4f} >= threshold {threshold}: near duplicates", True
    elif accept is not None and score >= accept:
        why, grouped = f"score {score:.4f} >= {accept}: near duplicates without a geometric check", True
    else:
        inliers, copy = _check_pair(pa, pb)
        grouped = bool(copy)
        why = (f"score {score:.4f} >= threshold {threshold} and confirmed geometrically ({inliers} inliers, the "
               f"images agree): near duplicates" if copy else
               f"score {score:.4f} >= threshold {threshold} but not confirmed geometrically ({inliers} inliers"
               f"{', the images differ where they overlap' if inliers else ''}): look-alikes, not grouped")  # fmt: skip
        if copy is None:  # too few keypoints to tell
            grouped = auto and score >= DEFAULT_THRESHOLD
            verdict = "near duplicates" if grouped else "not grouped"
            why = (f"score {score:.4f}; too little texture for a geometric check ({inliers} inliers), so judged by "
                   f"cosine: {verdict} (threshold {DEFAULT_THRESHOLD})")  # fmt: skip
    text = f"{pa}\n{pb}\nscore: {score:.4f}\n{why}"
    return text, {"a": pa, "b": pb, "score": round(score, 6), "threshold": threshold,
                  "exact": same, "grouped": grouped, "reason": why, "inliers": inliers}  # fmt: skip


def _check_pair(pa: str, pb: str) -> tuple[int, bool | None]:
    from .verify import judge_pair, prepare_image

    (fa, ga), (fb, gb) = prepare_image(pa), prepare_image(pb)
    return judge_pair(fa, fb, ga, gb)


def _rotation_pairs(embedder: Any, paths: list[str], vecs: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """Pairs (i, j) where a rotated or mirrored version of file i scores >= threshold against file j."""
    import faiss

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    pos = {p: k for k, p in enumerate(paths)}
    out_i, out_j, out_s = [], [], []
    chunk: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not chunk:
            return
        q = np.ascontiguousarray(np.concatenate([v for _, v in chunk]), dtype=np.float32)
        owner = np.repeat(np.array([k for k, _ in chunk], dtype=np.int64), 4)
        lims, dist, labels = index.range_search(q, threshold)
        counts = np.diff(lims).astype(np.int64)
        src = np.repeat(owner, counts)
        keep = src != labels
        out_i.append(src[keep])
        out_j.append(labels[keep].astype(np.int64))
        out_s.append(dist[keep].astype(np.float32))
        chunk.clear()

    for path, variants in embedder.embed_variants(paths):
        if variants is not None:
            chunk.append((pos[path], variants))
        if len(chunk) >= 256:
            flush()
    flush()
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


SLOT_ORDER_MIN = 20_000


def _pairs_in_slot_order(store: IndexStore, rep_ids: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """Similar pairs straight from the memory-mapped vector file (no copy of N vectors), mapped to rep positions.

    Removed slots are zero and non-representative rows (byte copies of a representative) are dropped, so the result
    equals `similar_pairs` over the representatives' vectors.
    """
    from .graph import similar_pairs

    view = store.vectors_file.view(int(rep_ids.max()) + 1)
    i, j, s = similar_pairs(view, threshold)
    pos = np.full(len(view), -1, np.int64)
    pos[rep_ids] = np.arange(len(rep_ids))
    a, b = pos[i], pos[j]
    keep = (a >= 0) & (b >= 0)
    a, b, s = a[keep], b[keep], s[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((hi, lo))
    return lo[order], hi[order], s[order]


def _merge_pairs(*arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of two (i, j, score) pair lists as i < j with the best score per pair."""
    i1, j1, s1, i2, j2, s2 = arrays
    i = np.concatenate([i1, np.minimum(i2, j2)]).astype(np.int64)
    j = np.concatenate([j1, np.maximum(i2, j2)]).astype(np.int64)
    s = np.concatenate([s1, s2]).astype(np.float32)
    order = np.lexsort((-s, j, i))
    i, j, s = i[order], j[order], s[order]
    first = np.ones(len(i), bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[first], j[first], s[first]
