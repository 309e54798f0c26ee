"""What the server holds between requests: the opened index (reopened when another process commits), the model,
cached dedup reports and thumbnails. Every method is a plain Python call, so the HTTP layer stays a thin skin."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ..api import Match, SimIndex
from ..decode_budget import BUDGET
from ..dedup.actions import apply_plan, plan_files, undo_list
from ..dedup.actions import undo as undo_manifest
from ..dedup.finder import DedupReport, DupGroup, find_duplicates
from ..dedup.journal import recover, recovery_message
from ..errors import BadInputError, IndexLockedError
from ..images import DRAFT_COVERAGE, OTHER_MEDIA_COST, ImageLoadError, decoded, load_encoded, sniff_bytes
from ..index.store import IndexStore, Row, root_of
from ..media.video import sniff_video
from .errors import ConflictError, ForbiddenError, NotFoundError, TooLargeError
from .files import check_fingerprint, open_indexed, stream

log = logging.getLogger("simsearch.serve")
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 50_000_000  # 8660 x 5773: far above any camera, far below a decompression bomb
THUMB_SIZES = (16, 1024)
THUMB_CACHE_BYTES = 64 * 1024 * 1024
RERANK_SECONDS = 10.0  # re-ranking stops checking candidates after this; the rest keep their global order
DECODE_WAIT_SECONDS = 45.0  # longest wait for the decode budget before answering 503 (a burst of huge images)
_UNDO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.json")  # fullmatch: no path, no trailing newline
THRESHOLD_RANGE = (0.80, 1.0)  # the page's threshold field; resolve refuses anything else
_MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
                "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff", "HEIF": "image/heif",
                "AVIF": "image/avif", "ICO": "image/x-icon"}  # fmt: skip
MAX_ID = 2**63 - 1  # SQLite's largest rowid: a larger id is no image of any index


@dataclass
class ServeConfig:
    read_only: bool = False
    move_to: Path | None = None
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_UPLOAD_PIXELS
    engine: str = "auto"
    rerank_seconds: float | None = RERANK_SECONDS


class ThumbnailCache:
    """EXIF-oriented JPEG thumbnails in a memory LRU bounded in bytes; keyed by the file's size and mtime."""

    def __init__(self, max_bytes: int = THUMB_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, st: os.stat_result, size: int | tuple, make: Callable[[], bytes]) -> bytes:
        """The thumbnail of the opened file whose fstat is `st` (cached by device, inode, size and mtime)."""
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, size)
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                return data
        data = make()
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes and self._items:
                self._bytes -= len(self._items.popitem(last=False)[1])
        return data


def make_thumbnail(source: str | BinaryIO, size: int, name: str | None = None) -> bytes:
    """A JPEG whose longer side is at most `size`, upright (EXIF applied), never upscaled; the full-size decode
    counts against the decode budget until it is shrunk."""
    buf = io.BytesIO()
    with decoded(source, target=math.ceil(size / DRAFT_COVERAGE), name=name) as im:
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        im.save(buf, "JPEG", quality=85, optimize=True)
    return buf.getvalue()


def video_thumbnail(f: BinaryIO, size: int, t: float) -> bytes:
    """A JPEG of a video's frame at `t` seconds, its longer side at most `size` (held as one large picture)."""
    from ..media.video import frame_at

    buf = io.BytesIO()
    f.seek(0)
    with BUDGET.hold(OTHER_MEDIA_COST):
        im = frame_at(f, t, math.ceil(size / DRAFT_COVERAGE))
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        im.save(buf, "JPEG", quality=85, optimize=True)
    return buf.getvalue()


def _faiss_threads(n: int) -> None:
    """OpenMP threads for FAISS calls of the calling thread (the setting is per thread).

    One query scans the flat index on one thread: called from a pool thread, a two-thread team made each clothing
    search 7.9 ms instead of 1.2 ms (2 cores). A dedup report, a whole-index job, uses every core.
    """
    import faiss

    faiss.omp_set_num_threads(n)


class ServeState:
    """The index and model loaded once; `index()` answers from the last committed generation."""

    def __init__(self, index_path: str | Path, config: ServeConfig | None = None) -> None:
        self.config = config or ServeConfig()
        self.path = Path(index_path).expanduser().absolute()
        self.lock = threading.RLock()  # the SQLite connection and the reload are shared by the request threads
        self._idx = SimIndex.open(self.path, engine=self.config.engine)
        self._generation = self._idx.store.generation
        self._idx.store.faiss_index  # noqa: B018  (load now, not on the first request)
        self._dedup: dict[tuple, DedupReport] = {}
        self.thumbnails = ThumbnailCache()
        self._validated: OrderedDict[tuple, bool] = OrderedDict()  # originals that decoded, by file version
        if not self.config.read_only:
            self._recover()

    def _recover(self) -> None:
        """Roll back file actions a crash interrupted, unless another writer is busy (it will, on its next open)."""
        store = self._idx.store
        try:
            store.acquire_lock()
        except IndexLockedError:
            return
        try:
            for line in recovery_message(recover(store)):
                log.warning("simsearch: %s", line)
        finally:
            store.release_lock()

    def warm_up(self) -> None:
        """Build the model and run it once, so the first query is as fast as the others.

        An index of imported vectors has no model: it is served by id only (uploads get the one-line reason).
        """
        if self._idx.store.signature.get("weights") == "external":
            return
        emb = self._idx.embedder
        s = emb.backbone.input_size
        emb.embed_pixels(np.zeros((1, s, s, 3), np.uint8))

    def close(self) -> None:
        with self.lock:
            self._idx.close()

    # ---- the committed state ---------------------------------------------------------------------------------
    def index(self) -> SimIndex:
        """The index, reopened first when another process committed since it was loaded (call under `lock`)."""
        if self._idx.store.generation != self._generation:
            store = IndexStore.open(self.path)
            if store.signature == self._idx.store.signature:  # same model: keep the loaded embedder
                old, self._idx.store = self._idx.store, store
                old.close()
            else:
                self._idx.close()
                self._idx = SimIndex(store, {"engine": self.config.engine})
            self._generation = store.generation
            store.faiss_index  # noqa: B018
            self._dedup.clear()
        return self._idx

    @property
    def generation(self) -> int:
        return self._generation

    def row(self, image_id: int) -> Row:
        """The index row of an id; 404 for any other id (negative or past SQLite's range included)."""
        if not 0 <= image_id <= MAX_ID:
            raise NotFoundError(f"no image with id {image_id} in the index")
        with self.lock:
            row = self.index().store.rows([image_id]).get(image_id)
        if row is None:
            raise NotFoundError(f"no image with id {image_id} in the index")
        return row

    def open_file(self, image_id: int) -> tuple[BinaryIO, os.stat_result, Row]:
        """The opened file of an indexed image: inside the index's roots, no link followed past the check,
        unchanged since indexing (see `serve.files`); 404 or 409 otherwise."""
        row = self.row(image_id)
        with self.lock:
            roots = self.index().store.roots
        f, st = open_indexed(row, roots, str(self.path))
        return f, st, row

    def original(self, image_id: int) -> tuple[Iterator[bytes], str, int]:
        """(bytes, media type, length) of an indexed file, sent only once it decodes as the image type it claims.

        The decode (budgeted, JPEGs at 1/8 scale: every byte is still parsed) is remembered per file version, so
        a file is checked once; the bytes come from the descriptor that was checked.
        """
        f, st, row = self.open_file(image_id)
        try:
            fmt = sniff_bytes(os.pread(f.fileno(), 64, 0))
            media = _MEDIA_TYPES.get(fmt or "")
            if media is None:
                raise NotFoundError(f"image {image_id} is a {fmt or 'non-image'} file, not sent as an original "
                                    "(its thumbnail is)")  # fmt: skip
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in self._validated:
                self._decode_checked(image_id, lambda: make_thumbnail(f, THUMB_SIZES[0], row.path))
                with self.lock:
                    self._validated[key] = True
                    while len(self._validated) > 4096:
                        self._validated.popitem(last=False)
                check_fingerprint(row, os.fstat(f.fileno()))  # not rewritten in place while it was checked
        except BaseException:
            f.close()
            raise
        return stream(f, st.st_size), media, st.st_size

    def thumbnail(self, image_id: int, size: int, t: float | None = None) -> bytes:
        """An upright JPEG of the indexed file, decoded from the checked descriptor (cached per file version); of a
        video, the frame at `t` seconds when given."""
        f, st, row = self.open_file(image_id)
        with f:
            if t is not None and sniff_video(f.read(64)):
                return self.thumbnails.get(st, (size, round(t, 3)), lambda: self._decode_checked(
                    image_id, lambda: video_thumbnail(f, size, t)))  # fmt: skip
            return self.thumbnails.get(st, size, lambda: self._decode_checked(
                image_id, lambda: make_thumbnail(f, size, row.path)))  # fmt: skip

    @staticmethod
    def _decode_checked(image_id: int, make: Callable[[], bytes]) -> bytes:
        try:
            return make()
        except ImageLoadError as e:
            raise ConflictError(f"the file of image {image_id} does not decode as an image ({e.reason}); run "
                                "`simsearch index` on its folder to update the index") from None  # fmt: skip

    # ---- search ------------------------------------------------------------------------------------------------
    def search_id(self, image_id: int, k: int, min_score: float | None, rerank: int = 0) -> dict[str, Any]:
        q = self.row(image_id)
        with self.lock:
            idx = self.index()
            _faiss_threads(1)
            matches = idx.search(image_id, k=max(k, rerank), min_score=min_score)
            job = self._rerank_job(idx, image_id, None, matches, rerank, min_score) if rerank else None
        return self._finish_search(job, matches, k, {"query": q.path, "query_id": q.id, "width": q.width,
                                                      "height": q.height})  # fmt: skip

    def _rerank_job(
        self, idx: SimIndex, query: Any, vec: Any, matches: list[Match], rerank: int, min_score: float | None
    ) -> Any:
        """The re-ranking of a search: with visual words in the index, of the global and words rankings fused (the
        query's local features are then extracted here, under the lock), else of the global matches."""
        may_read = self._may_read(idx)
        if not idx.has_words():
            return idx.prepare_rerank(query, matches, may_read)
        qf = idx.query_features(query, may_read)
        vec = idx.vector_for(query) if vec is None else vec
        found = idx.first_stage(vec, matches, rerank, qf, min_score)
        return idx.prepare_rerank(query, found, may_read, qf=qf)

    @staticmethod
    def _may_read(idx: SimIndex) -> Callable[[str], bool]:
        """Which indexed files re-ranking may read for features the index does not store: those inside its roots."""
        roots = idx.store.roots
        return lambda path: root_of(os.path.realpath(path), roots) is not None

    def _finish_search(self, job: Any, matches: list[Match], k: int, out: dict[str, Any]) -> dict[str, Any]:
        """Re-rank (without the lock, within `RERANK_SECONDS`) when asked, then answer with the matches' rows."""
        if job is not None:
            matches, out["rerank"] = job.run(k, self.config.rerank_seconds)
        else:
            matches = matches[:k]
        with self.lock:
            rows = self.index().store.rows([m.id for m in matches])
        out["matches"] = _matches(matches, rows)
        return out

    def search_upload(
        self, data: bytes, name: str | None, k: int, min_score: float | None, rerank: int = 0
    ) -> dict[str, Any]:
        """Embed uploaded bytes (same decoding as indexing, lower pixel limit) and search; no lock while embedding."""
        if len(data) > self.config.max_upload_bytes:
            raise TooLargeError(f"upload over the limit of {self.config.max_upload_bytes} bytes")
        sha = hashlib.sha256(data).hexdigest()  # outside the lock: other requests go on meanwhile
        with self.lock:
            idx = self.index()
            emb, known = idx.embedder, idx.vector_of_content(sha)  # the bytes of an indexed file: its stored vector
        # decoded under the process's decode budget; over the pixel limit: ImageTooLargeError, answered 413
        pixels, (w, h) = load_encoded(data, emb.backbone.input_size, emb.fit, max_pixels=self.config.max_pixels)
        vec = known[None] if known is not None else emb.embed_pixels(pixels[None])
        with self.lock:
            idx = self.index()
            _faiss_threads(1)
            matches = idx.search_vectors(vec, k=max(k, rerank), min_score=min_score)[0]
            job = self._rerank_job(idx, data, vec[0], matches, rerank, min_score) if rerank else None
        return self._finish_search(job, matches, k, {"query": name or "upload", "query_id": None, "width": w,
                                                      "height": h})  # fmt: skip

    # ---- duplicates --------------------------------------------------------------------------------------------
    def report(self, threshold: float, group: str, keep: str | None) -> DedupReport:
        """The dedup report of the committed state, computed once per generation and parameters.

        It is computed on a connection of its own, without the lock, so searches go on meanwhile.
        """
        params = (round(threshold, 6), group, keep)
        with self.lock:
            self.index()
            rep = self._dedup.get((self._generation, *params))
        if rep is not None:
            return rep
        _faiss_threads(os.cpu_count() or 1)
        with IndexStore.open(self.path) as store:
            generation = store.generation
            rep = find_duplicates(store, threshold, group=group, keep=keep)
        with self.lock:
            if len(self._dedup) > 16:
                self._dedup.clear()
            self._dedup[(generation, *params)] = rep
        return rep

    def duplicates(
        self, threshold: float, group: str, keep: str | None, offset: int, limit: int, similar: bool = True
    ) -> dict[str, Any]:
        rep = self.report(threshold, group, keep)
        if not similar:
            rep = DedupReport(rep.threshold, [g for g in rep.groups if g.is_copy], rep.group_mode, rep.keep_rules,
                              rep.verified, rep.tiers)  # fmt: skip
        page = rep.groups[offset : offset + limit]
        with self.lock:
            rows = self.index().store.rows([i for g in page for i in g.ids])
        out = rep.to_json()
        out["groups"] = [_group_json(g, rows) for g in page]
        out.update({"total_groups": len(rep.groups), "offset": offset, "limit": limit, "generation": self._generation})
        return out

    def resolve(
        self,
        ids: list[int],
        remove: list[int],
        action: str,
        threshold: float,
        group: str,
        keep: str | None,
        include_similar: bool = False,
    ) -> dict[str, Any]:
        """Move or trash the chosen files of one group, holding the writer lock; returns the undo manifest's name.
        Other shots (a similar group) are only removed with `include_similar`."""
        self._check_writable()
        check_threshold(threshold)
        remove = list(dict.fromkeys(remove))
        if action == "move" and self.config.move_to is None:
            raise ForbiddenError("move needs a destination: start the server with --move-to DIR")
        if not remove:
            raise BadInputError("choose at least one file to remove")
        if not set(remove) <= set(ids):
            raise BadInputError("every removed id must be a member of the group")
        if set(remove) == set(ids):
            raise BadInputError("refusing to remove every file of a group: keep at least one")
        with self.lock:
            found = _find_group(self.report(threshold, group, keep), ids)
            if found is None:
                raise ConflictError("this group is no longer in the index (it changed since it was listed); reload")
            if not found.is_copy and not include_similar:
                raise BadInputError("other shots of one scene, not copies: set include_similar to remove them")
            store = self.index().store
            rows = store.rows(remove)
            paths = [rows[i].path for i in remove]
            plan = plan_files(paths, action, self.config.move_to, store)
            store.acquire_lock()
            try:
                manifest = apply_plan(plan, store)
            finally:
                store.release_lock()
            self._generation = store.generation
            moved = [{"id": i, "from": s, "to": d} for i, (s, d) in zip(remove, plan.moves, strict=True)]
        return {"action": action, "moved": moved, "undo": manifest.name if manifest else None}

    def undo(self, name: str) -> dict[str, Any]:
        """Undo one action of this index's journal, named by its manifest's file name only (never a path)."""
        self._check_writable()
        if not _UNDO_NAME.fullmatch(name):
            raise BadInputError("undo must name a manifest of this index's undo folder, e.g. 20261201-1200-delete.json")
        if not any(a["undo"] == name for a in undo_list(self.path)):
            raise NotFoundError(f"no action {name} to undo in this index's journal")
        with self.lock:
            store = self.index().store
            store.acquire_lock()  # fail with 409 before moving anything back when another writer is busy
            store.release_lock()
            result = undo_manifest(self.path / "undo" / name)
        return {"undo": name, **result}

    def undo_list(self) -> list[dict[str, Any]]:
        return undo_list(self.path)

    def _check_writable(self) -> None:
        if self.config.read_only:
            raise ForbiddenError("this server is read-only (--read-only): it changes no files")


def check_threshold(threshold: float) -> None:
    """Resolve acts only at thresholds the page offers: lower ones group files that are not copies."""
    lo, hi = THRESHOLD_RANGE
    if not (lo <= threshold <= hi):
        raise BadInputError(f"threshold must be between {lo} and {hi}")


def _matches(matches: list[Match], rows: dict[int, Row]) -> list[dict[str, Any]]:
    out = []
    for m in matches:
        r = rows.get(m.id)
        out.append({"id": m.id, "path": m.path, "score": round(m.score, 6),
                    "width": r.width if r else None, "height": r.height if r else None,
                    **({"inliers": m.inliers} if m.inliers is not None else {}),
                    **({"stage": m.stage} if m.stage is not None else {}),
                    **({"time_s": round(m.time_s, 3)} if m.time_s is not None else {})})  # fmt: skip
    return out


def _group_json(g: DupGroup, rows: dict[int, Row]) -> dict[str, Any]:
    out = g.to_json()
    out["ids"] = list(g.ids)
    out["members"] = [
        {
            "id": i,
            "path": f,
            "score": round(float(s), 6),
            "keep": f == g.keep,
            "size": rows[i].size if i in rows else None,
            "width": rows[i].width if i in rows else None,
            "height": rows[i].height if i in rows else None,
        }  # fmt: skip
        for i, f, s in zip(g.ids, g.files, g.scores, strict=True)
    ]
    return out


def _find_group(report: DedupReport, ids: list[int]) -> DupGroup | None:
    want = set(ids)
    return next((g for g in report.groups if set(g.ids) == want), None)
