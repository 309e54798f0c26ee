"""The frames of indexed videos: their times and vectors, next to the index's rows.

A video is one row of the index like any file (its vector is the normalised mean of its frames' vectors, so moves,
copies, exact duplicates, undo and sync treat it as they treat a photo), plus its sampled frames: a `frames` table
(time in seconds) and `frames.f32` (float32 vectors at slot = frame id), and a `videos` table (duration, bit rate,
codec). Frames are keyed by the video's content hash, not its row: a moved, copied or restored video keeps them
without decoding it again. Frames of videos no longer indexed stay until `--rebuild` and are never answered (every
frame hit is mapped to the live rows holding its hash).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Any

import numpy as np

from .store import FRAMES_FILE, IndexStore, Txn, VectorFile

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS videos (sha256 TEXT PRIMARY KEY, duration REAL, bit_rate INTEGER, codec TEXT, "
    "frames INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS frames (id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL, t REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS frames_sha256 ON frames(sha256)",
)
SCAN_CHUNK = 65_536


@dataclass
class Video:
    sha256: str
    duration: float
    bit_rate: int | None
    codec: str
    frame_ids: np.ndarray
    times: np.ndarray


def _has_tables(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='frames'").fetchone() is not None


def frames_file(store: IndexStore) -> VectorFile:
    vf = getattr(store, "_frames_file", None)
    if vf is None or vf.dim != store.dim:  # a --rebuild may change the model's size
        vf = VectorFile(store.path / FRAMES_FILE, store.dim)
        store._frames_file = vf  # type: ignore[attr-defined]
    return vf


def add_video(txn: Txn, sha256: str, info: dict[str, Any], times: list[float], vectors: np.ndarray) -> bool:
    """Record a video's frames (once per content hash) inside the caller's transaction; the vectors are written and
    fsynced before it commits. Returns False when the hash already has its frames."""
    conn = txn.conn
    for sql in _SCHEMA:
        conn.execute(sql)
    if conn.execute("SELECT 1 FROM videos WHERE sha256=?", (sha256,)).fetchone():
        return False
    vf = frames_file(txn.store)
    v = np.ascontiguousarray(vectors, np.float32)
    for t, vec in zip(times, v, strict=True):
        fid = int(conn.execute("INSERT INTO frames (sha256, t) VALUES (?, ?)", (sha256, float(t))).lastrowid)
        vf.write(fid, vec)
    vf.sync()
    conn.execute("INSERT INTO videos VALUES (?,?,?,?,?)",
                 (sha256, info.get("duration"), info.get("bit_rate"), info.get("codec"), len(times)))  # fmt: skip
    txn.changed = True
    return True


def video_shas(store: IndexStore) -> set[str]:
    """Content hashes of the indexed videos (one query; the caller caches per generation if it needs to)."""
    if not _has_tables(store.conn):
        return set()
    return {r[0] for r in store.conn.execute("SELECT sha256 FROM videos")}


def videos(store: IndexStore, shas: list[str] | set[str] | None = None) -> dict[str, Video]:
    """The videos of `shas` (all when None) with their frame ids and times in time order."""
    if not _has_tables(store.conn):
        return {}
    if shas is None:
        rows = store.conn.execute("SELECT sha256, duration, bit_rate, codec FROM videos").fetchall()
        framed = store.conn.execute("SELECT id, sha256, t FROM frames").fetchall()
    else:  # only the asked videos' rows (a query names a few of them: never the whole table)
        rows = store._in_query("SELECT sha256, duration, bit_rate, codec FROM videos WHERE sha256 IN ({})", list(shas))
        framed = store._in_query("SELECT id, sha256, t FROM frames WHERE sha256 IN ({})", list(shas))
    out = {s: Video(s, d or 0.0, b, c or "", np.zeros(0, np.int64), np.zeros(0)) for s, d, b, c in rows}
    frames: dict[str, list[tuple[int, float]]] = {}
    for fid, sha, t in sorted(framed, key=lambda r: (r[1], r[2])):
        if sha in out:
            frames.setdefault(sha, []).append((fid, t))
    for sha, fr in frames.items():
        out[sha].frame_ids = np.array([f for f, _ in fr], np.int64)
        out[sha].times = np.array([t for _, t in fr], np.float64)
    return out


def frame_vectors(store: IndexStore, ids: np.ndarray) -> np.ndarray:
    return frames_file(store).read(ids.tolist())


def search_frames(store: IndexStore, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search of every stored frame: (scores, frame ids), each (n, k), -1 where fewer exist.

    The frames file is scanned in chunks through its memory map (a flat scan: one frame per two seconds of video
    keeps it small next to the photos)."""
    q = np.ascontiguousarray(q, np.float32)
    vf = frames_file(store)
    n = vf.slots
    live = live_frames(store, n)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    if n == 0:
        return best_s, best_i
    m = vf.view(n)
    for lo in range(1, n, SCAN_CHUNK):  # slot 0 is never a frame (ids start at 1)
        block = np.asarray(m[lo : lo + SCAN_CHUNK])
        s = q @ block.T
        s[:, ~live[lo : lo + len(block)]] = -np.inf  # frames of videos no longer indexed (kept for undo)
        ids = np.arange(lo, lo + len(block), dtype=np.int64)
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], axis=1)
        top = np.argpartition(-s_all, min(k, s_all.shape[1] - 1), axis=1)[:, :k]
        best_s = np.take_along_axis(s_all, top, axis=1)
        best_i = np.take_along_axis(i_all, top, axis=1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)


def live_frames(store: IndexStore, n: int) -> np.ndarray:
    """A mask over frame slots: True where the frame's video is indexed now (cached per generation)."""
    gen = store.generation
    cached = getattr(store, "_live_frames", None)
    if cached is not None and cached[0] == gen and len(cached[1]) >= n:
        return cached[1]
    mask = np.zeros(n, bool)
    if _has_tables(store.conn):
        ids = [r[0] for r in store.conn.execute(
            "SELECT f.id FROM frames f WHERE EXISTS (SELECT 1 FROM images i WHERE i.sha256 = f.sha256)")]  # fmt: skip
        ids_arr = np.asarray(ids, np.int64)
        mask[ids_arr[ids_arr < n]] = True
    store._live_frames = (gen, mask)  # type: ignore[attr-defined]
    return mask


def frame_owner(store: IndexStore, frame_ids: list[int]) -> dict[int, tuple[str, float]]:
    """frame id -> (video content hash, time in seconds)."""
    if not frame_ids or not _has_tables(store.conn):
        return {}
    rows = store._in_query("SELECT id, sha256, t FROM frames WHERE id IN ({})", [int(i) for i in frame_ids])
    return {int(i): (s, float(t)) for i, s, t in rows}


def clear(store: IndexStore) -> None:
    """Forget every frame (a --rebuild: the model changes, so must every vector)."""
    if _has_tables(store.conn):
        with store.conn:
            store.conn.execute("DELETE FROM frames")
            store.conn.execute("DELETE FROM videos")
    frames_file(store).close()
    store._frames_file = None  # type: ignore[attr-defined]
    p = store.path / FRAMES_FILE
    if p.exists():
        os.truncate(p, 0)


@dataclass
class Alignment:
    """How two videos' frame sequences correspond: the share of the shorter one's frames that match the other at one
    time offset, their mean similarity there, and the offset (seconds to add to the first's times)."""

    coverage: float
    similarity: float
    offset: float

    @property
    def score(self) -> float:
        return self.coverage * self.similarity


ALIGN_MIN_SIM = 0.75  # a frame pair this similar can vote for an offset, and counts as matched
ALIGN_TOLERANCE = 1.5  # seconds: frames sampled on two copies' own keyframes fall this far apart at most


def align(ta: np.ndarray, va: np.ndarray, tb: np.ndarray, vb: np.ndarray) -> Alignment:
    """Align two sampled frame sequences (times, vectors): the offset most frame matches agree on, then how much of
    the shorter sequence matches at it. A copy (re-encoded, resized, trimmed, re-containered) covers nearly all of
    the shorter one; two clips that only share an intro cover the intro's few frames."""
    if len(ta) == 0 or len(tb) == 0:
        return Alignment(0.0, 0.0, 0.0)
    s = np.asarray(va, np.float32) @ np.asarray(vb, np.float32).T
    ii, jj = np.nonzero(s >= ALIGN_MIN_SIM)
    if len(ii) == 0:
        return Alignment(0.0, float(s.max()), 0.0)
    d = tb[jj] - ta[ii]
    # the offset with the most support within the tolerance (a 1-d sweep over the candidate offsets)
    order = np.sort(d)
    hi = np.searchsorted(order, order + 2 * ALIGN_TOLERANCE, side="right")
    best = int(np.argmax(hi - np.arange(len(order))))
    lo_d, hi_d = order[best], order[hi[best] - 1]
    # refined: the median offset of each first-sequence frame's best match inside that window
    inside_w = ((tb[None, :] - ta[:, None]) >= lo_d) & ((tb[None, :] - ta[:, None]) <= hi_d)
    best_j = np.where(inside_w, s, -np.inf).argmax(axis=1)
    ok = np.where(inside_w, s, -np.inf).max(axis=1) >= ALIGN_MIN_SIM
    offset = float(np.median(tb[best_j[ok]] - ta[ok])) if ok.any() else float((lo_d + hi_d) / 2)
    near = np.abs((tb[None, :] - ta[:, None]) - offset) <= ALIGN_TOLERANCE
    masked = np.where(near, s, -1.0)
    if len(ta) <= len(tb):
        best_sim = masked.max(axis=1)
    else:
        best_sim = masked.max(axis=0)
    matched = best_sim >= ALIGN_MIN_SIM
    if not matched.any():
        return Alignment(0.0, 0.0, offset)
    return Alignment(float(matched.mean()), float(best_sim[matched].mean()), offset)
