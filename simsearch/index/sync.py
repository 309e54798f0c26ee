"""Bring an index up to date with a folder: add new files, re-embed changed ones, drop deleted ones.

Unchanged files (same path, size and mtime) are not even opened. A file whose bytes are already indexed (a move, a
rename or a copy) reuses the stored vector without decoding. Work is committed in chunks, so a killed run loses at
most the chunk in flight and the next run resumes from there.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..images import scan_images
from ..media.raw import RAW_SUFFIXES
from ..media.video import VIDEO_SUFFIXES
from ..models.embedder import Embedder, FileRecord
from ..sources import is_url
from ..sources.remote import list_objects
from .store import IndexStore, Row
from .videos import add_video

ProgressFn = Callable[[int, int], None]
NOT_AN_IMAGE = "not an image (unknown format)"
# Files with these endings that do not decode are reported; other non-image files (notes, CSVs) are ignored.
STILL_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif", ".avif",
                  ".jp2"}  # fmt: skip
IMAGE_SUFFIXES = STILL_SUFFIXES | RAW_SUFFIXES | VIDEO_SUFFIXES


@dataclass
class SyncReport:
    """Counts of what one `index` run did; `skipped` lists files that could not be read, with the reason."""

    index: str
    total: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    moved: int = 0
    embedded: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    ray: dict[str, Any] | None = None  # set by a `--ray` run: address, workers, shards, start_s, steady_img_s
    local_features: dict[str, Any] | None = None  # set when the index keeps local features (spatial re-ranking)
    recovered: list[dict[str, Any]] | None = None  # file actions a crash interrupted, rolled back before the sync

    @property
    def indexed(self) -> int:
        """Images whose vectors were added or refreshed in this run."""
        return self.added + self.updated

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "indexed": self.indexed,
            "skipped": self.skipped,
            "total": self.total,
            "seconds": round(self.seconds, 3),
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "moved": self.moved,
            "embedded": self.embedded,
            "interrupted": self.interrupted,
            **({"ray": self.ray} if self.ray is not None else {}),
            **({"local_features": self.local_features} if self.local_features is not None else {}),
            **({"recovered": self.recovered} if self.recovered else {}),
        }


class SyncInterrupted(Exception):
    """Raised after Ctrl-C once finished work is committed; carries the partial report."""

    def __init__(self, report: SyncReport) -> None:
        super().__init__("interrupted")
        self.report = report


def sync_folder(
    store: IndexStore,
    embedder: Embedder | Callable[[], Embedder],
    folder: str | Path,
    progress: ProgressFn | None = None,
    commit_every: int = 256,
    commit_seconds: float = 10.0,
) -> SyncReport:
    """Sync `folder` (recursively) into `store`; the caller holds the store's write lock.

    `embedder` may be a zero-argument factory: it is only called when some file needs embedding, so a no-op sync
    never loads the model (or TensorFlow).
    """
    t0 = time.perf_counter()
    report = SyncReport(index=str(store.path))
    if is_url(folder):
        scope = str(folder).rstrip("/")
        store.add_roots([scope])
        listed = {o.url: (o.size, o.mtime_ns) for o in list_objects(scope, IMAGE_SUFFIXES)}
        existing = {r.path: r for r in store.rows_under(scope, sep="/")}
    else:
        root = Path(folder).expanduser()
        if not root.exists():
            raise BadInputError(f"folder not found: {root}")
        root = Path(os.path.abspath(root))
        store.add_roots([root])  # before any row under it commits: the server serves files inside the roots only
        found, walk_skips = scan_images(root, exclude=[store.path])
        for p, reason in walk_skips:
            if reason != NOT_AN_IMAGE or p.suffix.lower() in IMAGE_SUFFIXES:
                report.skipped.append({"path": str(p), "error": reason})
        listed = {}
        for f in found:
            try:
                st = os.stat(f)
            except OSError as e:
                report.skipped.append({"path": str(f), "error": f"cannot read: {e.strerror or e}"})
                continue
            listed[str(f)] = (st.st_size, st.st_mtime_ns)
        scope = str(root)
        existing = {r.path: r for r in (store.rows_under(scope) if root.is_dir() else [store.row_by_path(scope)]) if r}
    report.total = len(listed) + len(report.skipped)
    failed = {p: (s, m, e) for p, s, m, e in store.failures()}
    present = set(listed)

    todo: list[str] = []
    for p, (size, mtime_ns) in listed.items():
        row = existing.get(p)
        if row is not None and row.size == size and row.mtime_ns == mtime_ns:
            report.unchanged += 1
            continue
        f = failed.get(p)
        if row is None and f is not None and f[0] == size and f[1] == mtime_ns:
            report.skipped.append({"path": p, "error": f[2]})
            continue
        todo.append(p)

    gone = {p: r for p, r in existing.items() if p not in present}
    gone_by_sha: dict[str, list[Any]] = {}
    for r in gone.values():
        gone_by_sha.setdefault(r.sha256, []).append(r)
    sha_ids = store.sha_to_id()
    under = scope.rstrip("/" if is_url(scope) else os.sep) + ("/" if is_url(scope) else os.sep)
    stale_failures = [p for p in failed if (p == scope or p.startswith(under)) and p not in present]

    done = 0
    pending: list[FileRecord] = []
    last_commit = time.monotonic()

    def commit() -> None:
        nonlocal pending, last_commit
        chunk, pending, last_commit = pending, [], time.monotonic()
        if chunk:
            with _deferred_interrupt():
                _apply(store, chunk, existing, gone, gone_by_sha, sha_ids, report)

    try:
        if progress:
            progress(0, len(todo))
        batches = (
            (embedder if isinstance(embedder, Embedder) else embedder()).embed_files(todo, sha_ids.__contains__)
            if todo
            else []
        )
        for batch in batches:
            pending.extend(batch)
            done += len(batch)
            if len(pending) >= commit_every or time.monotonic() - last_commit > commit_seconds:
                commit()
            if progress:
                progress(done, len(todo))
        commit()
        with _deferred_interrupt(), store.transaction() as txn:
            txn.delete(r.id for r in gone.values())
            txn.forget_failures(stale_failures)
        report.removed = len(gone)
    except KeyboardInterrupt:
        commit()
        report.interrupted = True
    finally:
        with _deferred_interrupt():
            store.save()
        report.seconds = time.perf_counter() - t0
    if report.interrupted:
        raise SyncInterrupted(report)
    return report


@contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so a commit and the in-memory state that mirrors it never diverge."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _apply(
    store: IndexStore,
    records: list[FileRecord],
    existing: dict[str, Any],
    gone: dict[str, Any],
    gone_by_sha: dict[str, list[Any]],
    sha_ids: dict[str, int],
    report: SyncReport,
) -> None:
    """Commit one chunk of pipeline records in a single transaction."""
    reuse = sorted({sha_ids[r.sha256] for r in records if r.error is None and r.sha256 in sha_ids})
    src_rows = store.rows(reuse)
    src_vecs = dict(zip(reuse, store.vectors(reuse), strict=True)) if reuse else {}
    with store.transaction() as txn:
        for rec in records:
            row = existing.get(rec.path)
            if rec.error is not None:
                report.skipped.append({"path": rec.path, "error": rec.error})
                txn.fail(rec.path, rec.size, rec.mtime_ns, rec.error)
                if row is not None:
                    txn.delete([row.id])
                    _forget(sha_ids, row)
                    report.removed += 1
                continue
            if row is not None and row.sha256 == rec.sha256:
                txn.update_file(row.id, rec.path, rec.size, rec.mtime_ns)
                report.unchanged += 1
                continue
            src = sha_ids.get(rec.sha256)
            if src is not None and row is None and gone_by_sha.get(rec.sha256):
                moved = gone_by_sha[rec.sha256].pop()
                txn.update_file(moved.id, rec.path, rec.size, rec.mtime_ns)
                gone.pop(moved.path, None)
                report.moved += 1
                continue
            if src is not None and src in src_vecs:
                vector, width, height = src_vecs[src], src_rows[src].width, src_rows[src].height
            elif rec.vector is not None:
                vector, width, height = rec.vector, rec.width, rec.height
                report.embedded += 1
            else:  # its twin changed in this very run; the next run embeds it
                continue
            if row is not None:
                rid = txn.replace_vector(row.id, rec.size, rec.mtime_ns, rec.sha256, width, height, vector)
                _forget(sha_ids, row)
                report.updated += 1
            else:
                rid = txn.insert(rec.path, rec.size, rec.mtime_ns, rec.sha256, width, height, vector)
                report.added += 1
            if rec.frames is not None and rec.frame_times is not None:
                add_video(txn, rec.sha256, rec.video or {}, rec.frame_times, rec.frames)
            if rec.sha256 not in sha_ids:
                sha_ids[rec.sha256] = rid
                src_vecs[rid] = np.asarray(vector, dtype=np.float32)
                src_rows[rid] = Row(rid, rec.path, rec.size, rec.mtime_ns, rec.sha256, width, height)


def _forget(sha_ids: dict[str, int], row: Any) -> None:
    if sha_ids.get(row.sha256) == row.id:
        del sha_ids[row.sha256]
