"""On-disk index: a SQLite database, a float32 vector file, an optional FAISS search structure and a manifest.

SQLite is the source of truth for which images exist: every change is one SQLite transaction that also bumps a
generation counter. Each row's vector lives once, in `vectors.f32` at slot = the row's id (memory-mapped by
readers, so opening costs nothing whatever the size). A slot is written and fsynced before the transaction that
creates its row commits, and a committed slot is never rewritten (a changed file gets a new row), so a process
killed at any moment leaves every committed row with its vector. A row's CRC-32 of its vector is kept for `verify`.

The search structure (`search-GEN.faiss`, see `ann`) is a snapshot written under a new name (temp file, fsync,
rename) before the manifest that names it, with its generation, size and sha256, replaces the old manifest; the
previous file is deleted only then, so a crash leaves either the old pair or the new one. It covers rows up to
`search_max_id`; rows committed after it (a sync in progress, or one killed before saving) are found by an exact
scan of the slots past it, and removed rows are filtered out, so readers always answer from the last committed
state. Readers memory-map IVF structures.
"""

from __future__ import annotations

import fcntl
import functools
import json
import mmap
import os
import socket
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexCorruptError, IndexLockedError, IndexMismatchError, IndexNotFoundError
from ..models.backbones import file_digest

FORMAT = "simsearch-index"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
DATABASE = "meta.sqlite"
VECTORS_FILE = "vectors.f32"
FRAMES_FILE = "frames.f32"  # video frames' vectors (see `videos`)
SEARCH_FILE = "search-{generation}.faiss"
LOCK_FILE = "write.lock"
# Fields of the embedder signature that must match for vectors to be comparable.
SIGNATURE_KEYS = ("backbone", "weights_digest", "input_size", "pooling", "dim", "fit", "precision")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER,
    height INTEGER,
    added_at REAL NOT NULL,
    vcrc INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY,
    size INTEGER,
    mtime_ns INTEGER,
    error TEXT NOT NULL,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview | np.ndarray) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Row:
    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int | None
    height: int | None

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9


_ROW_COLS = "id, path, size, mtime_ns, sha256, width, height"


def _root_key(p: str | os.PathLike) -> str:
    """A root as recorded: a folder's real path, or an object-storage URL as given (no trailing slash)."""
    from ..sources import is_url

    if is_url(p):
        return str(p).rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(p))))


def root_of(real: str, roots: Iterable[str]) -> str | None:
    """The longest of `roots` (real paths) that holds the resolved path `real`, or None: outside them all."""
    for root in sorted(roots, key=len, reverse=True):
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return root
    return None


def _faiss() -> Any:
    import faiss

    return faiss


PREFETCH_ROWS = 512  # reads of up to this many rows are prefetched row by row (larger ones are scans)


class VectorFile:
    """Float32 vectors at slot = image id in one flat file: read through a memory map, written with pwrite."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim = path, dim
        self.row_bytes = dim * 4
        self._map: np.ndarray | None = None
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._seen: np.ndarray | None = None  # rows this process has read (see `_prefetch_unseen`)
        self._seen_n = 0

    @property
    def slots(self) -> int:
        try:
            return os.path.getsize(self.path) // self.row_bytes
        except OSError:
            return 0

    def view(self, need: int = 0) -> np.ndarray:
        """A read-only (slots, dim) memory map covering at least `need` slots (remapped as the file grows)."""
        with self._lock:
            if self._map is None or len(self._map) < need or (need == 0 and len(self._map) < self.slots):
                n = self.slots
                self._map = (
                    np.memmap(self.path, dtype=np.float32, mode="r", shape=(n, self.dim))
                    if n
                    else np.zeros((0, self.dim), np.float32)
                )
            return self._map

    def read(self, ids: Iterable[int]) -> np.ndarray:
        idx = ids if isinstance(ids, np.ndarray) and ids.dtype == np.int64 else np.asarray(list(ids), dtype=np.int64)
        if len(idx) == 0:
            return np.zeros((0, self.dim), np.float32)
        top = int(idx.max())
        m = self.view(top + 1)
        if top >= len(m):
            raise IndexCorruptError(f"{self.path} is shorter than the index says (truncated?); recover with --rebuild")
        if 1 < len(idx) <= PREFETCH_ROWS:
            self._prefetch_unseen(m, idx)
        # a plain array over the map: fancy indexing copies the rows out, without np.memmap's per-call overhead
        return m.view(np.ndarray)[idx]

    def _prefetch_unseen(self, m: np.ndarray, idx: np.ndarray) -> None:
        """Prefetch the rows this process has not read before. A row read once stays in the OS's cache unless
        memory runs short, and asking again for a row already in memory is a system call for nothing. Once the
        rows read add up to a quarter of the machine's memory, the OS may have dropped some: the marks start over."""
        seen = self._seen
        if seen is None or len(seen) < len(m):
            grown = np.zeros(len(m), bool)
            if seen is not None:
                grown[: len(seen)] = seen
            self._seen = seen = grown
        new = idx[~seen[idx]]
        if len(new):
            seen[new] = True
            self._seen_n += len(new)
            if self._seen_n * self.row_bytes > _memory_share():  # more than memory holds: marks go stale, start over
                seen[:] = False
                self._seen_n = 0
            if len(new) > 1:
                self._prefetch(m, new)

    def _prefetch(self, m: np.ndarray, idx: np.ndarray) -> None:
        """Ask the OS for every row at once (MADV_WILLNEED): rows not in memory are then read in parallel instead
        of one page fault after another (a query re-scoring 40 rows of a large, partly paged-out file)."""
        mm = getattr(m, "_mmap", None)
        advise = getattr(mm, "madvise", None)
        if advise is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = idx * self.row_bytes
        page = start - start % mmap.PAGESIZE
        will = mmap.MADV_WILLNEED
        try:
            for p, n in zip(page.tolist(), (start + self.row_bytes - page).tolist(), strict=True):
                advise(will, p, n)
        except (OSError, ValueError):
            return

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._fd

    def write(self, rid: int, vector: np.ndarray) -> None:
        os.pwrite(self._open(), np.ascontiguousarray(vector, np.float32).tobytes(), rid * self.row_bytes)

    def clear(self, rids: Iterable[int]) -> None:
        """Zero removed slots (after their rows are gone), so exact scans score them 0 and never rank them."""
        fd = self._open()
        zero = bytes(self.row_bytes)
        size = os.fstat(fd).st_size
        for rid in rids:
            if (rid + 1) * self.row_bytes <= size:
                os.pwrite(fd, zero, rid * self.row_bytes)

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._map = self._seen = None


@functools.cache
def _seek_paths(n: int) -> str:
    return " UNION ALL ".join(["SELECT id, path FROM images WHERE id=?"] * n)


@functools.cache
def _memory_share() -> int:
    """A quarter of physical memory, in bytes (1 GiB where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def vector_crc(v: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(v, np.float32).tobytes())


class IndexStore:
    """One index directory. Readers just open it; a writer takes the lock, then changes it in transactions."""

    def __init__(self, path: Path, manifest: dict[str, Any], conn: sqlite3.Connection) -> None:
        self.path = path
        self.manifest = manifest
        self.conn = conn
        self.vectors_file = VectorFile(path / VECTORS_FILE, int(manifest["dim"]))
        self._index: Any = None  # the search structure (None: flat, or not loaded)
        self._index_loaded = False
        self._index_writable = False
        self._index_dirty = False
        self._search_changed = False
        self._lock_fd: int | None = None
        self._setups: dict[tuple[int, int | None], tuple[Any, str, Any]] = {}  # see _search_setup
        self._stats: tuple[int, int, int] | None = None  # (generation, count, max id), read once per generation
        self._sig: tuple[int, dict[str, Any]] | None = None  # (generation, signature)
        self.index_type = manifest.get("index_type", "auto")
        self.memory_budget: int | None = manifest.get("memory_budget")
        # set by a Ray sync: fills a trained, empty structure from every stored vector elsewhere (index.merge), or
        # returns None to leave it to this process
        self.fill_structure: Callable[[Any, np.ndarray, Callable], dict[str, Any] | None] | None = None

    # ---- creation and opening -------------------------------------------------------------------------------
    @staticmethod
    def exists(path: str | Path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def create(
        cls,
        path: str | Path,
        signature: dict[str, Any],
        extra: dict[str, Any] | None = None,
        index_type: str = "auto",
        memory_budget: int | None = None,
    ) -> IndexStore:
        """Create an empty index directory (fails if one already exists there)."""
        path = Path(path).absolute()
        if cls.exists(path):
            raise IndexMismatchError(f"an index already exists at {path}")
        if path.exists() and not path.is_dir():
            raise IndexNotFoundError(f"{path} exists and is not a directory")
        from .ann import INDEX_TYPES, check_factory

        if index_type not in INDEX_TYPES:
            check_factory(index_type, int(signature["dim"]))
        path.mkdir(parents=True, exist_ok=True)
        for name in (DATABASE, VECTORS_FILE):
            (path / name).unlink(missing_ok=True)
        for old in path.glob("search-*.faiss"):
            old.unlink()
        conn = _connect(path / DATABASE)
        with conn:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT INTO meta VALUES ('generation', '0')")
            conn.execute("INSERT INTO meta VALUES ('signature', ?)", (json.dumps(signature, sort_keys=True),))
        (path / VECTORS_FILE).touch()
        now = _now()
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **signature,
            "metric": "inner_product",
            "index_type": index_type,
            "memory_budget": memory_budget,
            "vectors_file": VECTORS_FILE,
            "search": {"kind": "flat", "factory": None},
            "generation": -1,
            "created": now,
            "updated": now,
            "counts": {"images": 0, "failed": 0},
            **(extra or {}),
        }
        store = cls(path, manifest, conn)
        store.save()
        return store

    @classmethod
    def open(cls, path: str | Path) -> IndexStore:
        """Open an existing index without reading its vectors; a missing, foreign or damaged index is a clear error."""
        path = Path(path).absolute()
        mpath = path / MANIFEST
        if not mpath.is_file():
            if not path.exists():
                raise IndexNotFoundError(f"no index at {path}")
            raise IndexNotFoundError(f"{path} is not a simsearch index (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise IndexCorruptError(f"cannot read {mpath}: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IndexNotFoundError(f"{path} is not a simsearch index")
        if manifest.get("version") == 1:
            from .migrate import migrate_v1

            manifest = migrate_v1(path, manifest)
        if manifest.get("version") != FORMAT_VERSION:
            raise IndexMismatchError(
                f"index {path} has format version {manifest.get('version')}, this simsearch reads version "
                f"{FORMAT_VERSION}; rebuild it with `simsearch index FOLDER --index {path} --rebuild`"
            )
        if not (path / DATABASE).is_file():
            raise IndexCorruptError(f"index {path} is missing {DATABASE}; rebuild it with --rebuild")
        if not (path / VECTORS_FILE).is_file():
            raise IndexCorruptError(f"index {path} is missing {VECTORS_FILE}; rebuild it with --rebuild")
        conn = _connect(path / DATABASE)
        try:
            conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        except sqlite3.DatabaseError as e:
            raise IndexCorruptError(
                f"index database {path / DATABASE} is damaged ({e}); rebuild it with --rebuild"
            ) from e
        store = cls(path, manifest, conn)
        store._check_sizes()
        return store

    @staticmethod
    def discard(path: str | Path) -> None:
        """Remove an index's data files (for --rebuild of a damaged index); undo manifests and trash stay."""
        path = Path(path)
        for name in (MANIFEST, DATABASE, DATABASE + "-wal", DATABASE + "-shm", VECTORS_FILE, FRAMES_FILE):
            (path / name).unlink(missing_ok=True)
        for old in path.glob("search-*.faiss"):
            old.unlink()

    def _check_sizes(self) -> None:
        """Cheap damage checks at open: the vector file covers every committed slot, the search file has its size."""
        want = int(self.manifest.get("vectors_slots", 0))
        if self.vectors_file.slots < want:
            raise IndexCorruptError(
                f"{self.vectors_file.path} is truncated ({self.vectors_file.slots} of {want} vectors); recover with "
                f"`simsearch index FOLDER --index {self.path} --rebuild`"
            )
        search = self.manifest.get("search") or {}
        if search.get("kind", "flat") != "flat":
            f = self.path / str(search.get("file"))
            if not f.is_file() or f.stat().st_size != search.get("bytes"):
                raise IndexCorruptError(
                    f"index file {f} is missing or has the wrong size (damaged); `simsearch verify --index "
                    f"{self.path}` tells more, `simsearch index FOLDER --index {self.path}` rebuilds it"
                )

    def close(self) -> None:
        self.release_lock()
        self.vectors_file.close()
        self.conn.close()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- signature --------------------------------------------------------------------------------------------
    @property
    def signature(self) -> dict[str, Any]:
        row = self.conn.execute("SELECT value FROM meta WHERE key='signature'").fetchone()
        return json.loads(row[0])

    def signature_at(self, gen: int) -> dict[str, Any]:
        """The signature as of generation `gen` (which the caller just read), parsed once per generation."""
        if self._sig is None or self._sig[0] != gen:
            self._sig = (gen, self.signature)
        return self._sig[1]

    def check_signature(self, signature: dict[str, Any]) -> None:
        """Refuse to mix vectors of different models (or inputs, pooling, precision) in one index."""
        mine = self.signature
        diffs = [
            f"{k} {mine.get(k)!r} != {signature.get(k)!r}" for k in SIGNATURE_KEYS if mine.get(k) != signature.get(k)
        ]
        if diffs:
            raise IndexMismatchError(
                f"index {self.path} was built with backbone {mine.get('backbone')} "
                f"(weights {mine.get('weights')}); the requested model differs ({'; '.join(diffs)}). "
                f"Use --rebuild to re-index with the new model, or another --index"
            )

    # ---- roots: the folders this index covers ------------------------------------------------------------------
    @property
    def roots(self) -> list[str]:
        """The folders (or single files) this index covers, as absolute real paths, sorted: every folder `index`
        synced and every `--root` given to `import`. Empty for an index made before simsearch recorded them (and for
        imports without roots): such an index's files are not served until its folder is synced again."""
        row = self.conn.execute("SELECT value FROM meta WHERE key='roots'").fetchone()
        if row is None:
            return []
        try:
            values = json.loads(row[0])
        except ValueError as e:
            raise IndexCorruptError(f"index {self.path} has a damaged list of roots ({e}); run `simsearch index "
                                    "FOLDER` again") from e  # fmt: skip
        return [v for v in values if isinstance(v, str)] if isinstance(values, list) else []

    def add_roots(self, paths: Iterable[str | os.PathLike]) -> None:
        """Record folders (or files) as roots of this index, by real path; known ones are skipped.

        Call it under the writer lock. Inside `transaction()` it commits with the transaction; otherwise it commits
        at once (a SQLite commit, as durable as the rows). The generation does not move: roots change no rows.
        """
        have = self.roots
        new = sorted({_root_key(p) for p in paths} - set(have))
        if not new:
            return
        value = json.dumps(sorted(have + new))
        if self.conn.in_transaction:
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('roots', ?)", (value,))
            return
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('roots', ?)", (value,))

    # ---- locking -----------------------------------------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Take the single-writer lock; a second writer is told which process holds it."""
        lp = self.path / LOCK_FILE
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise IndexLockedError(f"index {self.path} is being written by {holder}; wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        self._lock_fd = fd

    @property
    def holds_lock(self) -> bool:
        """Whether this store holds the writer lock."""
        return self._lock_fd is not None

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- reading -----------------------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def _counts(self, gen: int | None = None) -> tuple[int, int]:
        """(rows, max id) of the committed state, cached per generation (COUNT(*) scans the table). `gen`: the
        generation when the caller just read it (a search reads it once)."""
        gen = self.generation if gen is None else gen
        if self._stats is None or self._stats[0] != gen:
            n, top = self.conn.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM images").fetchone()
            self._stats = (gen, int(n), int(top))
        return self._stats[1], self._stats[2]

    def count(self) -> int:
        return self._counts()[0]

    def failed_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM failures").fetchone()[0])

    def max_id(self) -> int:
        return self._counts()[1]

    @property
    def dim(self) -> int:
        return int(self.signature["dim"])

    @property
    def faiss_index(self) -> Any:
        """The loaded search structure (None for flat): readers memory-map IVF files, writers load them whole."""
        if not self._index_loaded:
            self._index = self._load_search(writable=self.holds_lock)
            self._index_loaded = True
            self._index_writable = self.holds_lock
        return self._index

    def _search_current(self) -> bool:
        return self.manifest.get("search", {}).get("kind", "flat") != "flat"

    def _load_search(self, writable: bool) -> Any:
        if not self._search_current():
            return None
        f = _faiss()
        fpath = self.path / str((self.manifest.get("search") or {}).get("file"))
        flags = 0 if writable else (f.IO_FLAG_MMAP | f.IO_FLAG_READ_ONLY)
        try:
            index = f.read_index(str(fpath), flags)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise IndexCorruptError(f"cannot read {fpath} ({first[:200]}); `simsearch index FOLDER` rebuilds it") from e
        from .ann import set_param

        set_param(index, (self.manifest.get("search") or {}).get("value"))
        return index

    def iter_vectors(self, chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of all rows in id order, streamed in chunks."""
        last = -1
        while True:
            ids = np.fromiter(
                (r[0] for r in self.conn.execute("SELECT id FROM images WHERE id > ? ORDER BY id LIMIT ?",
                                                 (last, chunk))),
                dtype=np.int64,
            )  # fmt: skip
            if len(ids) == 0:
                return
            yield ids, self.vectors_file.read(ids)
            last = int(ids[-1])

    def vectors(self, ids: Iterable[int]) -> np.ndarray:
        """The stored vectors of `ids` (in that order); unknown ids are a KeyError."""
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        known = self._live(ids)
        missing = [i for i in ids if i not in known]
        if missing:
            raise KeyError(missing[0])
        return self.vectors_file.read(ids)

    def _in_query(self, sql: str, values: list[Any]) -> list[tuple]:
        out: list[tuple] = []
        for i in range(0, len(values), 900):
            part = values[i : i + 900]
            out += self.conn.execute(sql.format(",".join("?" * len(part))), part).fetchall()
        return out

    def _live(self, ids: Iterable[int]) -> set[int]:
        return {r[0] for r in self._in_query("SELECT id FROM images WHERE id IN ({})", [int(i) for i in ids])}

    def rows(self, ids: Iterable[int]) -> dict[int, Row]:
        return {r[0]: Row(*r) for r in self._in_query(f"SELECT {_ROW_COLS} FROM images WHERE id IN ({{}})", list(ids))}

    def paths(self, ids: Iterable[int]) -> dict[int, str]:
        """id -> path of those of `ids` that are indexed (what a search answer needs, and no more)."""
        ids = list(ids)
        if 0 < len(ids) <= 32:  # a search's answer: one seek per id (an IN list first builds a temporary table)
            return dict(self.conn.execute(_seek_paths(len(ids)), ids).fetchall())
        return dict(self._in_query("SELECT id, path FROM images WHERE id IN ({})", ids))

    def row_by_path(self, path: str) -> Row | None:
        r = self.conn.execute(f"SELECT {_ROW_COLS} FROM images WHERE path=?", (path,)).fetchone()
        return Row(*r) if r else None

    def rows_by_path(self, paths: Iterable[str]) -> dict[str, Row]:
        """The rows of those of `paths` that are indexed, by path."""
        return {r[1]: Row(*r) for r in self._in_query(f"SELECT {_ROW_COLS} FROM images WHERE path IN ({{}})",
                                                      list(paths))}  # fmt: skip

    def rows_by_sha(self, shas: Iterable[str]) -> list[Row]:
        """Every row holding one of these contents."""
        return [Row(*r) for r in self._in_query(f"SELECT {_ROW_COLS} FROM images WHERE sha256 IN ({{}})", list(shas))]

    def all_rows(self) -> list[Row]:
        return [Row(*r) for r in self.conn.execute(f"SELECT {_ROW_COLS} FROM images ORDER BY id")]

    def rows_under(self, root: str, sep: str = os.sep) -> list[Row]:
        prefix = root.rstrip(sep) + sep
        return [
            Row(*r)
            for r in self.conn.execute(
                f"SELECT {_ROW_COLS} FROM images WHERE substr(path, 1, ?) = ? OR path = ?",
                (len(prefix), prefix, root),
            )
        ]

    def failures(self) -> list[tuple[str, int, int, str]]:
        return self.conn.execute("SELECT path, size, mtime_ns, error FROM failures ORDER BY path").fetchall()

    def sha_to_id(self) -> dict[str, int]:
        return {sha: i for i, sha in self.conn.execute("SELECT id, sha256 FROM images ORDER BY id DESC")}

    def search(
        self, queries: np.ndarray, k: int, param: int | None = None, exact: bool = False, gen: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) of committed rows per query, exact cosines, best first (-1 ids pad short rows).

        The search structure proposes candidates (its `param`, nprobe or efSearch, from the manifest unless
        given); rows committed after it was saved come from an exact scan; every candidate is re-scored from the
        stored vectors and removed rows are dropped. `exact` scans everything. `gen`: the generation, when the
        caller just read it.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, int(k))
        count, top = self._counts(gen)
        n_slots = top + 1
        if count == 0 or len(q) == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        want = min(k, count)
        index = None if exact else self.faiss_index
        if index is None:  # exact: the scan's scores are the final ones; removed (zeroed) slots are dropped
            return self._exact(q, want, n_slots)
        fresh = self._index_writable and not self._index_dirty  # a writer keeps it in step with each commit
        covered = n_slots - 1 if fresh else int(self.manifest.get("search_max_id", -1))
        fetch, params = self._search_setup(index, k, param)
        cand = [index.search(q, fetch, params=params)[1]]
        if covered + 1 < n_slots:
            cand.append(self._scan(q, covered + 1, n_slots, want + self._dead_in(covered + 1, n_slots)))
        # one structure's answer names each id once per query; merged answers may repeat one
        merged = cand[0] if len(cand) == 1 else np.concatenate(cand, axis=1)
        scores, ids = self._rescore(q, merged, want, (count, top), distinct=len(cand) == 1)
        short = ids[:, -1] < 0  # short answers are padded at the end
        if not short.any():
            return scores, ids
        from .ann import wider_params

        wider = wider_params(index, param)  # near small lists: look 8x further before scanning everything
        if wider is not None:
            more = [c[short] for c in cand]
            more.append(index.search(q[short], fetch, params=wider)[1])
            scores[short], ids[short] = self._rescore(q[short], np.concatenate(more, axis=1), want)
            short = ids[:, -1] < 0
        if short.any():  # a structure can miss rows when few are left: an exact pass fills those queries
            full = self._scan(q[short], 0, n_slots, want + self._dead_in(0, n_slots))
            scores[short], ids[short] = self._rescore(q[short], full, want)
        return scores, ids

    def _search_setup(self, index: Any, k: int, param: int | None) -> tuple[int, Any]:
        """(candidates to fetch for top k, SearchParameters for an explicit `param`), cached per loaded structure:
        asking FAISS for the structure's type costs a good part of a small search. Without `param` the structure
        searches with its own setting (the tuned value, set when it is loaded or tuned)."""
        from .ann import candidates, codes, search_params

        key = (id(index), param)
        got = self._setups.get(key)
        if got is None or got[0] is not index:
            got = (index, codes(index), search_params(index, param))
            if len(self._setups) > 64:
                self._setups.clear()
            self._setups[key] = got
        return candidates(k, kind=got[1]), got[2]

    def _exact(self, q: np.ndarray, k: int, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        base = self.vectors_file.view(n_slots)[:n_slots]
        kk = min(len(base), k + self._dead_in(0, n_slots))
        sc, idx = faiss.knn(q, np.ascontiguousarray(base), kk, metric=faiss.METRIC_INNER_PRODUCT)
        live = self._live(np.unique(idx[idx >= 0]).tolist()) if kk > k or self._dead_in(0, n_slots) else None
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for r in range(len(q)):
            keep = idx[r] >= 0
            if live is not None:
                keep &= np.isin(idx[r], list(live))
            s_r, i_r = sc[r][keep][:k], idx[r][keep][:k]
            scores[r, : len(i_r)], ids[r, : len(i_r)] = s_r, i_r
        return scores, ids

    def _dead_in(self, lo: int, hi: int) -> int:
        """Removed slots in [lo, hi): they score 0 in an exact scan, so a scan fetches that many more."""
        count, top = self._counts()
        if lo == 0 and hi >= top + 1:
            live = count
        else:
            live = self.conn.execute("SELECT COUNT(*) FROM images WHERE id >= ? AND id < ?", (lo, hi)).fetchone()[0]
        return max(0, (hi - lo) - int(live))

    def _scan(self, q: np.ndarray, lo: int, hi: int, k: int) -> np.ndarray:
        """Ids of the exact top-k among slots [lo, hi) (removed slots are zero, so they score 0)."""
        import faiss

        base = self.vectors_file.view(hi)[lo:hi]
        kk = min(k, len(base))
        if kk == 0:
            return np.full((len(q), 0), -1, np.int64)
        _, idx = faiss.knn(q, np.ascontiguousarray(base), kk, metric=faiss.METRIC_INNER_PRODUCT)
        return np.where(idx >= 0, idx + lo, -1)

    def _rescore(
        self, q: np.ndarray, cand: np.ndarray, k: int, counts: tuple[int, int] | None = None, distinct: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of candidate ids from the stored vectors; removed ids dropped; top k per query.
        `counts`: `_counts()` when the caller just read it. `distinct`: a single query's candidates are known to
        be distinct (one structure's answer), so they need no de-duplication."""
        flat = cand[cand >= 0] if distinct and len(q) == 1 else _sorted_unique(cand[cand >= 0])
        count, top = counts or self._counts()
        if count == top:  # ids 1..top all live (nothing ever removed): no need to ask SQLite, per query
            live = flat[(flat >= 1) & (flat <= top)]
        else:
            live = np.array(sorted(self._live(flat.tolist())), np.int64)
        if len(q) == 1:  # one query (the common case): its candidates are exactly `live`
            s = self.vectors_file.read(live) @ q[0]
            best = np.lexsort((live, -s))[:k]  # ties by id, as the batch path's sorted candidates give
            if len(best) == k:
                return s[best][None], live[best][None]
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        if len(q) == 1:  # fewer candidates than k: padded
            scores[0, : len(best)], ids[0, : len(best)] = s[best], live[best]
            return scores, ids
        if len(live) == 0:
            return scores, ids
        vecs = self.vectors_file.read(live)
        pos = np.searchsorted(live, np.clip(cand, 0, None))
        pos = np.clip(pos, 0, len(live) - 1)
        ok = (cand >= 0) & (live[pos] == cand)
        for r in range(len(q)):
            c = _sorted_unique(pos[r][ok[r]])
            if len(c) == 0:
                continue
            s = vecs[c] @ q[r]
            top = np.argsort(-s, kind="stable")[:k]
            scores[r, : len(top)], ids[r, : len(top)] = s[top], live[c[top]]
        return scores, ids

    def rescore_fn(self) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
        """For tuning: candidate ids -> top-k ids after exact re-scoring."""
        return lambda q, cand, k: self._rescore(np.ascontiguousarray(q, np.float32), cand, k)[1]

    # ---- writing (caller holds the lock) -----------------------------------------------------------------------
    def _writable_index(self) -> Any:
        if self._index_loaded and not self._index_writable:
            self._index, self._index_loaded = None, False
        if not self._index_loaded:
            self._index = self._load_search(writable=True)
            self._index_loaded, self._index_writable = True, True
            if self._index is not None and int(self.manifest.get("search_generation", -2)) != self.generation:
                self._index_dirty = True  # rows committed after the last save: rebuilt from the vectors at save
        return self._index

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        """Apply a group of changes atomically: vectors written and fsynced, then one SQLite commit.

        A transaction that changes nothing commits nothing (the generation stays, so readers keep their caches).
        """
        txn = Txn(self)
        index = None
        with self.conn:
            yield txn
            if not txn.changed:
                return
            if txn.added_ids or txn.removed:
                index = self._writable_index()  # loaded before the generation moves on
            self.vectors_file.sync()
            self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        if not (txn.added_ids or txn.removed):
            return
        self._search_changed = True
        self.vectors_file.clear(txn.removed)
        if index is not None and not self._index_dirty:
            if txn.removed:
                try:
                    index.remove_ids(np.asarray(sorted(txn.removed), dtype=np.int64))
                except RuntimeError:  # HNSW cannot remove: rebuilt at save
                    self._index_dirty = True
            if txn.added_ids and not self._index_dirty:
                index.add_with_ids(self.vectors_file.read(txn.added_ids), np.asarray(txn.added_ids, np.int64))

    def save(self) -> None:
        """Bring the search structure in line with the rows (switching or retraining it when due), write it and
        the manifest atomically. A no-op when nothing changed since the last save."""
        gen = self.generation
        if self.manifest.get("generation") == gen and not self._index_dirty and (self.path / MANIFEST).is_file():
            return
        from .ann import IndexPlan, min_vectors, needs_rebuild, plan_for

        n = self.count()
        plan = plan_for(self.index_type, n, self.dim, self.memory_budget)
        if n < min_vectors(plan):
            plan = IndexPlan("flat", None)  # too few to train: exact until the collection grows
        built = self.manifest.get("search")
        search = dict(built or {})
        index = self._writable_index() if plan.kind != "flat" else None
        if plan.kind == "flat":
            self._index, self._index_loaded, self._index_writable = None, True, True
            search = {"kind": "flat", "factory": None}
        elif (
            index is not None
            and not self._index_dirty
            and not self._search_changed
            and not needs_rebuild(plan, built, n)
        ):
            pass  # only file metadata changed: the structure on disk is still exact
        else:
            if index is None or self._index_dirty or needs_rebuild(plan, built, n):
                index, search = self._build_search(plan, n)
            name = SEARCH_FILE.format(generation=gen)
            tmp = self.path / f".{name}.tmp-{os.getpid()}"
            _faiss().write_index(index, str(tmp))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            search["sha256"] = file_digest(tmp)
            search["bytes"] = tmp.stat().st_size
            search["file"] = name
            os.replace(tmp, self.path / name)
            _fsync_dir(self.path)
        self._index_dirty = self._search_changed = False
        self.manifest.update(
            {
                **{k: v for k, v in self.signature.items()},
                "index_type": self.index_type,
                "memory_budget": self.memory_budget,
                "search": search,
                "search_generation": gen,
                "search_max_id": self.max_id(),
                "vectors_slots": self.vectors_file.slots,
                "generation": gen,
                "updated": _now(),
                "counts": {"images": n, "failed": self.failed_count()},
            }
        )
        atomic_write(self.path / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode())
        keep = search.get("file")
        for old in self.path.glob("search-*.faiss"):  # only after the manifest names the new one
            if old.name != keep:
                old.unlink(missing_ok=True)

    def _build_search(self, plan: Any, n: int) -> tuple[Any, dict[str, Any]]:
        """Train (on a sample) and fill a structure from the stored vectors, then tune its search parameter."""
        from .ann import build, training_sample_size, tune

        t0 = time.perf_counter()
        ids_all = np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM images ORDER BY id")), np.int64)
        rng = np.random.default_rng(0)
        sample_ids = np.sort(rng.choice(ids_all, min(len(ids_all), training_sample_size(plan)), replace=False))
        index = build(plan, self.dim, self.vectors_file.read(sample_ids))
        t_train = time.perf_counter() - t0
        fill = self.fill_structure(index, ids_all, self.vectors_file.read) if self.fill_structure else None
        if fill is None:
            for a in range(0, len(ids_all), 65536):
                part = ids_all[a : a + 65536]
                index.add_with_ids(self.vectors_file.read(part), part)
            fill = {"by": "driver"}
        fill["train_s"] = round(t_train, 2)
        fill["fill_s"] = round(time.perf_counter() - t0 - t_train, 2)
        self._index, self._index_loaded, self._index_writable = index, True, True
        t_build = time.perf_counter() - t0
        q_ids = np.sort(rng.choice(ids_all, min(len(ids_all), 200), replace=False))
        queries = self.vectors_file.read(q_ids)
        # stored vectors as queries, their own entry left out on both sides (it is always found)
        exact = self._rescore(queries, self._scan(queries, 0, int(ids_all.max()) + 1, 11), 11)[1]
        truth = [set(row[row >= 0].tolist()) - {int(q)} for row, q in zip(exact, q_ids, strict=True)]
        tuned = tune(index, queries, truth, self.rescore_fn(), exclude=q_ids)
        return index, {**plan.to_json(), **tuned, "trained_on": n, "build_seconds": round(t_build, 2),
                       "tune_seconds": round(time.perf_counter() - t0 - t_build, 2), "fill": fill}  # fmt: skip

    def reset(self, signature: dict[str, Any]) -> None:
        """Drop every row and adopt a new signature in one transaction (used by --rebuild)."""
        with self.conn:
            self.conn.execute("DELETE FROM images")
            self.conn.execute("DELETE FROM failures")
            self.conn.execute("UPDATE meta SET value=? WHERE key='signature'", (json.dumps(signature, sort_keys=True),))
            self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        self.vectors_file.close()
        os.truncate(self.path / VECTORS_FILE, 0)
        self.vectors_file = VectorFile(self.path / VECTORS_FILE, int(signature["dim"]))
        self._index, self._index_loaded, self._index_writable, self._index_dirty = None, False, False, False
        self.manifest["search"] = {"kind": "flat", "factory": None}
        self.manifest["vectors_slots"] = 0
        self.manifest["created"] = _now()
        self.save()

    def set_index_type(self, index_type: str, memory_budget: int | None = None) -> None:
        """Choose another structure; the next save builds it."""
        from .ann import INDEX_TYPES, check_factory

        if index_type not in INDEX_TYPES:
            check_factory(index_type, self.dim)
        if index_type != self.index_type or memory_budget != self.memory_budget:
            self.index_type, self.memory_budget = index_type, memory_budget
            self._index_dirty = True


class Txn:
    """Changes staged inside `IndexStore.transaction()`."""

    def __init__(self, store: IndexStore) -> None:
        self.store = store
        self.conn = store.conn
        self.added_ids: list[int] = []
        self.removed: set[int] = set()
        self.changed = False

    def insert(self, path: str, size: int, mtime_ns: int, sha256: str, width: int | None, height: int | None,
               vector: np.ndarray) -> int:  # fmt: skip
        v = np.ascontiguousarray(vector, dtype=np.float32)
        if v.shape != (self.store.vectors_file.dim,):
            raise ValueError(f"vector of shape {v.shape}, index dim {self.store.vectors_file.dim}")
        cur = self.conn.execute(
            "INSERT INTO images (path, size, mtime_ns, sha256, width, height, added_at, vcrc) VALUES (?,?,?,?,?,?,?,?)",
            (path, size, mtime_ns, sha256, width, height, time.time(), vector_crc(v)),
        )
        self.conn.execute("DELETE FROM failures WHERE path=?", (path,))
        rid = int(cur.lastrowid)
        self.store.vectors_file.write(rid, v)
        self.added_ids.append(rid)
        self.changed = True
        return rid

    def replace_vector(self, rid: int, size: int, mtime_ns: int, sha256: str, width: int | None,
                       height: int | None, vector: np.ndarray) -> int:  # fmt: skip
        """A changed file: a new row (and slot) for its new content; the old row goes. Returns the new id."""
        path = self.conn.execute("SELECT path FROM images WHERE id=?", (rid,)).fetchone()[0]
        self.delete([rid])
        return self.insert(path, size, mtime_ns, sha256, width, height, vector)

    def update_file(self, rid: int, path: str, size: int, mtime_ns: int) -> None:
        """A file whose content is unchanged: new path (moved) and/or new size/mtime; the vector stays."""
        self.conn.execute("UPDATE images SET path=?, size=?, mtime_ns=? WHERE id=?", (path, size, mtime_ns, rid))
        self.conn.execute("DELETE FROM failures WHERE path=?", (path,))
        self.changed = True

    def delete(self, rids: Iterable[int]) -> None:
        rids = [int(r) for r in rids]
        self.changed = self.changed or bool(rids)
        for i in range(0, len(rids), 900):
            part = rids[i : i + 900]
            self.conn.execute(f"DELETE FROM images WHERE id IN ({','.join('?' * len(part))})", part)
        self.removed.update(rids)
        self.added_ids = [i for i in self.added_ids if i not in self.removed]

    def delete_paths(self, paths: Iterable[str]) -> None:
        ids = [r[0] for r in self.store._in_query("SELECT id FROM images WHERE path IN ({})", list(paths))]
        self.delete(ids)

    def fail(self, path: str, size: int, mtime_ns: int, error: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO failures (path, size, mtime_ns, error, seen_at) VALUES (?,?,?,?,?)",
            (path, size, mtime_ns, error, time.time()),
        )
        self.changed = True

    def forget_failures(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        self.changed = self.changed or bool(paths)
        self.conn.executemany("DELETE FROM failures WHERE path=?", [(p,) for p in paths])


SQLITE_MMAP_BYTES = 1 << 30  # address space only: pages are the OS's cache, shared and dropped under pressure


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        # rows are read through a memory map (no read call per page): a query's few rows are found in microseconds
        conn.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
    except sqlite3.DatabaseError as e:
        raise IndexCorruptError(f"index database {path} is damaged ({e}); rebuild it with --rebuild") from e
    return conn


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """`np.unique` of a small 1-D array (a query's candidates), at a fraction of its per-call cost."""
    x = np.sort(x, axis=None)
    return x[np.concatenate(([True], x[1:] != x[:-1]))] if len(x) > 1 else x
