"""Near-duplicate videos: copies whose frame sequences align (re-encoded, resized, trimmed, re-containered).

Candidate pairs come from a nearest-neighbour search of every sampled frame among all frames (so a two-hour film
costs its frames, never a comparison with every clip); each candidate pair is then aligned (`index.videos.align`).
A pair is a copy when at least VIDEO_COVERAGE of the shorter video's frames match the other at one time offset, with
a mean similarity of VIDEO_SIMILARITY or more: clips that share only an intro match a few frames and stay apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..index.store import IndexStore, Row
from ..index.videos import ALIGN_MIN_SIM, Alignment, Video, align, frame_vectors, search_frames, videos
from .graph import UnionFind

VIDEO_COVERAGE = 0.8
VIDEO_SIMILARITY = 0.85
NEIGHBOURS = 10  # frames looked up per frame
QUERY_CHUNK = 2048  # query frames per scan of the frames file
VIDEO_KEEP = ("resolution", "duration", "bitrate", "size")


Pair = tuple[int, int]


def video_pairs(store: IndexStore, reps: Sequence[Row]) -> tuple[list[Pair], dict[Pair, Alignment]]:
    """Pairs (positions in `reps`) of videos that are copies of each other, with every candidate's alignment."""
    pos = {r.sha256: i for i, r in enumerate(reps)}
    vids = videos(store, set(pos))
    if len(vids) < 2:
        return [], {}
    vecs = {sha: frame_vectors(store, v.frame_ids) for sha, v in vids.items()}
    owner: dict[int, str] = {int(f): sha for sha, v in vids.items() for f in v.frame_ids}
    cands: set[tuple[str, str]] = set()
    shas = [sha for sha, v in vids.items() for _ in range(len(v.frame_ids))]  # the video of each query frame
    queries = np.concatenate([vecs[sha] for sha, v in vids.items() if len(v.frame_ids)] or [np.zeros((0, store.dim))])
    for lo in range(0, len(queries), QUERY_CHUNK):  # all frames as queries, a chunk per scan of the frames file
        scores, fids = search_frames(store, queries[lo : lo + QUERY_CHUNK], NEIGHBOURS)
        for q, (srow, frow) in enumerate(zip(scores, fids, strict=True)):
            sha = shas[lo + q]
            for s, f in zip(srow, frow, strict=True):
                other = owner.get(int(f))
                if other is not None and other != sha and s >= ALIGN_MIN_SIM:
                    cands.add((sha, other) if sha < other else (other, sha))
    pairs: list[Pair] = []
    seen: dict[Pair, Alignment] = {}
    for a, b in sorted(cands):
        va, vb = vids[a], vids[b]
        al = align(va.times, vecs[a], vb.times, vecs[b])
        key = (pos[a], pos[b])
        seen[key] = al
        if al.coverage >= VIDEO_COVERAGE and al.similarity >= VIDEO_SIMILARITY:
            pairs.append(key)
    return pairs, seen


def video_groups(store: IndexStore, reps: Sequence[Row]) -> list[tuple[list[Row], list[float]]]:
    """Groups of copied videos, kept file first (resolution, then duration, then bit rate, then size), each member
    with its alignment score against the kept one (1.0 for the kept one)."""
    pairs, seen = video_pairs(store, reps)
    if not pairs:
        return []
    uf = UnionFind(len(reps))
    uf.union_many(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    members: dict[int, list[int]] = {}
    for i in {x for p in pairs for x in p}:
        members.setdefault(uf.find(i), []).append(i)
    info = videos(store, {reps[i].sha256 for g in members.values() for i in g})
    out = []
    for g in members.values():
        ranked = sorted(g, key=lambda i: video_keep_key(reps[i], info.get(reps[i].sha256)))
        first = ranked[0]
        scores = [1.0] + [_score(seen, first, i) for i in ranked[1:]]
        out.append(([reps[i] for i in ranked], scores))
    return out


def video_keep_key(row: Row, video: Video | None) -> tuple:
    """Smaller is better to keep: more pixels, then longer, then a higher bit rate, then a larger file."""
    duration = video.duration if video else 0.0
    bit_rate = (video.bit_rate or 0) if video else 0
    return (-((row.width or 0) * (row.height or 0)), -round(duration, 1), -bit_rate, -row.size, row.path)


def _score(seen: dict[tuple[int, int], Alignment], a: int, b: int) -> float:
    al = seen.get((a, b)) or seen.get((b, a))
    return round(al.score, 6) if al is not None else 0.0
