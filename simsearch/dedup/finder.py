"""Duplicate groups from an index: exact copies (same sha256), near-duplicate copies, and other shots (similar).

Two tiers: copies ("exact", and "near": the same capture re-encoded, resized, cropped, brightened, captioned...) and
other shots of the same scene or object ("similar": bursts, the same poster from another phone), told apart by
`tiers.compare` (aligned thumbnails and EXIF). Actions touch only copies unless asked.

Exact copies collapse to one representative each (the one the keep rules prefer); near-duplicate search then runs
over the representatives only, with FAISS-sized memory (no N x N matrix) and union-find or star grouping. So every
file that could go is counted once: `duplicates` = sum over groups of (size - 1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..index.store import IndexStore, Row
from ..index.videos import video_shas
from ..media.raw import RAW_SUFFIXES
from ..sources import is_url
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

    kind: str  # "exact" or "near" (copies), or "similar" (other shots of one scene; files[0] is the best shot)
    files: list[str]
    min_score: float
    ids: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # similarity of each file to files[0]
    shots: list[dict[str, float]] | None = None  # similar groups: each file's sharpness, exposure, shot score

    @property
    def is_copy(self) -> bool:
        return self.kind != "similar"

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
            **({"shots": self.shots} if self.shots is not None else {}),
        }


@dataclass
class DedupReport:
    threshold: float
    groups: list[DupGroup]
    group_mode: str = "connected"
    keep_rules: tuple[str, ...] = DEFAULT_KEEP
    verified: dict[str, Any] | None = None  # geometric confirmation: pairs checked, confirmed, dropped
    tiers: dict[str, Any] | None = None  # candidate pairs found to be copies / other shots, and how

    @property
    def duplicates(self) -> int:
        """Copies that could go (what an action removes by default)."""
        return sum(len(g.files) - 1 for g in self.groups if g.is_copy)

    @property
    def similar_files(self) -> int:
        """Other shots that could go besides each scene's best shot (only with include_similar)."""
        return sum(len(g.files) - 1 for g in self.groups if not g.is_copy)

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "groups": [g.to_json() for g in self.groups],
            "duplicates": self.duplicates,
            "similar_files": self.similar_files,
            "group": self.group_mode,
            "keep": list(self.keep_rules),
            **({"verified": self.verified} if self.verified is not None else {}),
            **({"tiers": self.tiers} if self.tiers is not None else {}),
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
    similar: bool = True,
) -> DedupReport:
    """Group the index's files into copies (exact and near groups, kept file first) and, with `similar`, groups of
    other shots of one scene (best shot first).

    `rotations`: an Embedder; when given, copies rotated by 90/180/270 degrees or mirrored are matched too (each
    representative file is decoded once more and embedded four times). `progress` is told each stage's name.
    Every candidate pair's tier (copy or another shot) comes from its aligned thumbnails and EXIF
    (`tiers.compare`). Which pairs are related at all, by default (`threshold` and `verify` None): pairs from
    AUTO_THRESHOLD up whose pixels do not place them are matched by local features (look-alikes dropped), except
    at ACCEPT_ABOVE or more; a pair whose file cannot be read falls back to the cosine rule. An explicit `threshold`
    alone, or `verify=False`, relates by cosine only (DEFAULT_THRESHOLD); `verify=True` matches every unplaced pair
    from `threshold` (VERIFY_THRESHOLD) up except those scoring `accept_above` or more.
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
        thumbs: dict[int, Any] = {}
        tier = np.zeros(len(i), np.int8)
        tiers = None
        if len(i):
            from .verify import COPY, SIMILAR, tier_pairs

            stage(f"copies or other shots: up to {len(i)} pairs")
            t = tier_pairs(store.path, reps, i, j, s, connected=group == "connected", local=bool(verify),
                           sure_above=accept_above, rotations=rotations is not None,
                           progress=verify_progress, threads=min(8, os.cpu_count() or 1))  # fmt: skip
            tier, thumbs = t.tier.copy(), t.thumbs
            # no verdict (unreadable, or too little texture to tell): related by cosine, as without verification, but
            # never a copy without evidence (other shots are never removed by default)
            rescue = t.no_verdict & (s >= (DEFAULT_THRESHOLD if verify else threshold))
            tier[rescue] = SIMILAR
            checked = ~t.implied & ~t.no_verdict
            tiers = {"pairs": len(i), "copies": int((tier == COPY).sum()), "similar": int((tier == SIMILAR).sum()),
                     "implied": int(t.implied.sum()), "local_features": int(t.local.sum())}  # fmt: skip
            if verify:
                verified = {"pairs": len(i), "checked": int(checked.sum()),
                            "confirmed": int((checked & (tier != 0)).sum()), "implied": int(t.implied.sum()),
                            "dropped": int((tier == 0).sum()), "no_verdict": int(t.no_verdict.sum()),
                            "accepted_unchecked": 0, "accept_above": accept_above}  # fmt: skip
        copy = tier == 2
        ci, cj, cs = i[copy], j[copy], s[copy]
        stage(f"grouping {len(ci)} copy pairs")
        if group == "star":
            found = star_groups(n, ci, cj, cs, np.arange(n))
            mins = group_min_scores(found, ci, cj, cs, centre_only=True)
        else:
            found = [np.sort(g) for g in connected_groups(n, ci, cj)]
            mins = group_min_scores(found, ci, cj, cs)
        for g, low in zip(found, mins, strict=True):
            members = [reps[int(x)] for x in g]
            members.sort(key=lambda r: keep_key(r, rules, prefer))
            ids = [m.id for m in members]
            v = store.vectors(ids)
            groups.append(DupGroup("near", [m.path for m in members], float(low), ids,
                                   [float(min(1.0, x)) for x in v @ v[0]]))  # fmt: skip
        if similar:
            groups.extend(_similar_groups(store, reps, found, i, j, s, tier, thumbs, prefer))
    order = {"exact": 0, "near": 1, "similar": 2}
    groups.sort(key=lambda g: (order[g.kind], g.files[0]))
    return DedupReport(threshold, groups, group, rules, verified, tiers if near else None)


def _similar_groups(
    store: IndexStore,
    reps: list[Row],
    copy_groups: list[np.ndarray],
    i: np.ndarray,
    j: np.ndarray,
    s: np.ndarray,
    tier: np.ndarray,
    thumbs: dict[int, Any],
    prefer: Sequence[str],
) -> list[DupGroup]:
    """Groups of other shots: scenes joined by similar pairs, one file per copy group (the one kept), best shot
    first (a --prefer folder still wins)."""
    from .graph import connected_groups, group_min_scores
    from .tiers import load_thumb, shot_score

    n = len(reps)
    head = np.arange(n)  # each file's copy group, named by its kept file
    for g in copy_groups:
        head[np.asarray(g)] = int(np.min(g))  # reps are in keep order: the smallest position is kept
    rel = tier > 0
    a, b = head[i[rel]], head[j[rel]]
    cross = a != b
    a, b, sc = a[cross], b[cross], s[rel][cross]
    out = []
    for g, low in zip(found := connected_groups(n, a, b), group_min_scores(found, a, b, sc), strict=True):
        members = [int(x) for x in g]
        for x in members:
            if x not in thumbs:
                try:
                    thumbs[x] = load_thumb(reps[x].path)
                except Exception:
                    thumbs[x] = None
        score = {x: (shot_score(thumbs[x]) if thumbs.get(x) is not None else -math.inf) for x in members}
        members.sort(key=lambda x: (not is_preferred(reps[x].path, prefer), -score[x], reps[x].path))
        ids = [reps[x].id for x in members]
        v = store.vectors(ids)
        shots = [{"sharpness": round(thumbs[x].sharpness, 1), "clipped": round(thumbs[x].exposure, 4),
                  "score": round(score[x], 3)} if thumbs.get(x) is not None else {} for x in members]  # fmt: skip
        out.append(DupGroup("similar", [reps[x].path for x in members], float(low), ids,
                            [float(min(1.0, y)) for y in v @ v[0]], shots))  # fmt: skip
    return out


def explain_pair(
    idx: Any, a: Any, b: Any, threshold: float | None = None, verify: bool | None = None
) -> tuple[str, dict[str, Any]]:
    """The cosine score of two files, whether find_duplicates (same `threshold` and `verify` meaning) relates them,
    and in which tier (copies, or other shots: "similar") with the evidence: the aligned thumbnails' agreement and
    residual shift, EXIF, and the local-feature inliers when those were needed."""
    auto = verify is None and threshold is None
    accept = ACCEPT_ABOVE if auto else None
    if auto:
        threshold, verify = auto_threshold(idx.store), True
    elif threshold is None:
        threshold = VERIFY_THRESHOLD if verify else DEFAULT_THRESHOLD
    va, vb = idx.vector_for(a), idx.vector_for(b)
    score = float(min(1.0, np.dot(va, vb)))
    pa, pb = (str(x) if is_url(x) else os.path.abspath(os.path.expanduser(str(x))) for x in (a, b))
    ra, rb = idx.store.row_by_path(pa), idx.store.row_by_path(pb)
    same = bool(ra and rb and ra.sha256 == rb.sha256)
    inliers = evidence = None
    tier = None
    if same:
        why, tier = "byte-identical files (same sha256): copies, an exact group", "exact"
    elif score < threshold:
        why = f"score {score:.4f} < threshold {threshold}: not related (lower --threshold to group them)"
    else:
        tier, why, inliers, evidence = _pair_tier(pa, pb, score, threshold, bool(verify), accept, auto)
    grouped = tier is not None
    label = {"exact": "copies (exact)", "near": "copies (near)", "similar": "other shots (similar)", None: "none"}
    text = f"{pa}\n{pb}\nscore: {score:.4f}\ntier: {label[tier]}\n{why}"
    return text, {"a": pa, "b": pb, "score": round(score, 6), "threshold": threshold, "exact": same,
                  "grouped": grouped, "kind": tier, "tier": "copy" if tier in ("exact", "near") else tier,
                  "reason": why, "inliers": inliers, "evidence": evidence}  # fmt: skip


def _pair_tier(
    pa: str, pb: str, score: float, threshold: float, verify: bool, accept: float | None, auto: bool
) -> tuple[str | None, str, int | None, dict[str, Any] | None]:
    """(kind or None, why, inliers, evidence) of one pair, by tier_pairs' rules."""
    from .tiers import compare, load_thumb
    from .verify import COPY, SIMILAR, local_features, local_tier

    try:
        ta, tb = load_thumb(pa), load_thumb(pb)
    except Exception as err:  # unreadable: the cosine rule
        ok = score >= (DEFAULT_THRESHOLD if verify else threshold)
        return ("near" if ok else None), f"cannot compare the images ({err}): judged by cosine", None, None
    ev = compare(ta, tb)
    facts = ev.to_json()
    head = f"score {score:.4f} >= threshold {threshold}; "
    if ev.tier == "copy":
        return "near", head + "copies: " + ev.why, None, facts
    if ev.tier == "similar":
        return "similar", head + "other shots of one scene: " + ev.why, None, facts
    if not verify or (accept is not None and score >= accept):
        rule = "cosine alone" if not verify else f"score >= {accept}"
        return "similar", head + f"other shots ({rule} relates them; the pixels: {ev.why})", None, facts
    fa, fb = local_features(pa), local_features(pb)
    t, bad, inliers = local_tier(fa, fb, ta, tb)
    if bad:
        ok = auto and score >= DEFAULT_THRESHOLD
        return (("near" if ok else None), f"score {score:.4f}; too little texture to tell ({inliers} inliers), so "
                f"judged by cosine: {'copies' if ok else 'not grouped'} (threshold {DEFAULT_THRESHOLD})",
                inliers, facts)  # fmt: skip
    if t == COPY:
        return "near", head + f"copies: aligned from local features ({inliers} inliers), {ev.why}", inliers, facts
    if t == SIMILAR:
        return "similar", head + f"other shots of one object ({inliers} inliers; the pixels: {ev.why})", inliers, facts
    return None, head + f"look-alikes, not grouped ({inliers} inliers; the pixels: {ev.why})", inliers, facts


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
