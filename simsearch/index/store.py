"""On-disk index: a FAISS file, a SQLite database and a JSON manifest in one directory.

SQLite is the source of truth: each image row holds its metadata *and* its vector, and every change is one SQLite
transaction that also bumps a generation counter. The FAISS file is a snapshot of those vectors written atomically
(temp file, fsync, rename) with its generation and sha256 in the manifest. A process killed at any moment therefore
leaves committed rows intact; when the FAISS snapshot is older than the database (killed before it was saved), it
is rebuilt in memory from the rows, so readers always answer from the last committed state.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexCorruptError, IndexLockedError, IndexMismatchError, IndexNotFoundError

FORMAT = "simsearch-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "meta.sqlite"
FAISS_FILE = "vectors.faiss"
LOCK_FILE = "write.lock"
FAISS_TYPE = "IDMap2,Flat"
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
    vector BLOB NOT NULL
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


def _faiss() -> Any:
    import faiss

    return faiss


def new_faiss_index(dim: int) -> Any:
    f = _faiss()
    return f.IndexIDMap2(f.IndexFlatIP(dim))


class IndexStore:
    """One index directory. Open read-only with `open()`, or for writing inside `writer()`."""

    def __init__(self, path: Path, manifest: dict[str, Any], conn: sqlite3.Connection) -> None:
        self.path = path
        self.manifest = manifest
        self.conn = conn
        self._index: Any = None
        self._lock_fd: int | None = None

    # ---- creation and opening -------------------------------------------------------------------------------
    @staticmethod
    def exists(path: str | Path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def create(cls, path: str | Path, signature: dict[str, Any], extra: dict[str, Any] | None = None) -> IndexStore:
        """Create an empty index directory (fails if one already exists there)."""
        path = Path(path).absolute()
        if cls.exists(path):
            raise IndexMismatchError(f"an index already exists at {path}")
        if path.exists() and not path.is_dir():
            raise IndexNotFoundError(f"{path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        (path / DATABASE).unlink(missing_ok=True)
        conn = _connect(path / DATABASE)
        with conn:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT INTO meta VALUES ('generation', '0')")
            conn.execute("INSERT INTO meta VALUES ('signature', ?)", (json.dumps(signature, sort_keys=True),))
        now = _now()
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **signature,
            "faiss_index": FAISS_TYPE,
            "metric": "inner_product",
            "faiss_file": FAISS_FILE,
            "faiss_sha256": None,
            "generation": -1,
            "created": now,
            "updated": now,
            "counts": {"images": 0, "failed": 0},
            **(extra or {}),
        }
        store = cls(path, manifest, conn)
        store._index = new_faiss_index(int(signature["dim"]))
        store.save()
        return store

    @classmethod
    def open(cls, path: str | Path) -> IndexStore:
        """Open an existing index; a missing, foreign or damaged index is a clear error."""
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
        if manifest.get("version") != FORMAT_VERSION:
            raise IndexMismatchError(
                f"index {path} has format version {manifest.get('version')}, this simsearch reads version "
                f"{FORMAT_VERSION}; rebuild it with `simsearch index FOLDER --index {path} --rebuild`"
            )
        if not (path / DATABASE).is_file():
            raise IndexCorruptError(f"index {path} is missing {DATABASE}; rebuild it with --rebuild")
        conn = _connect(path / DATABASE)
        try:
            conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        except sqlite3.DatabaseError as e:
            raise IndexCorruptError(
                f"index database {path / DATABASE} is damaged ({e}); rebuild it with --rebuild"
            ) from e
        return cls(path, manifest, conn)

    def close(self) -> None:
        self.release_lock()
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

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def failed_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM failures").fetchone()[0])

    @property
    def dim(self) -> int:
        return int(self.signature["dim"])

    @property
    def faiss_index(self) -> Any:
        """The FAISS index of the committed rows: the snapshot file when current, else rebuilt from SQLite."""
        if self._index is None:
            self._index = self._load_faiss()
        return self._index

    def _load_faiss(self) -> Any:
        f = _faiss()
        fpath = self.path / self.manifest.get("faiss_file", FAISS_FILE)
        if self.manifest.get("generation") == self.generation and fpath.is_file():
            data = fpath.read_bytes()
            if hashlib.sha256(data).hexdigest() != self.manifest.get("faiss_sha256"):
                raise IndexCorruptError(
                    f"index file {fpath} is damaged (checksum mismatch); recover with "
                    f"`simsearch index FOLDER --index {self.path} --rebuild`"
                )
            try:
                index = f.deserialize_index(np.frombuffer(data, dtype=np.uint8))
            except Exception as e:
                raise IndexCorruptError(f"cannot read {fpath} ({e}); recover with --rebuild") from e
            if index.ntotal == self.count():
                return index
        return self._rebuild_faiss()

    def _rebuild_faiss(self) -> Any:
        index = new_faiss_index(self.dim)
        for ids, vecs in self.iter_vectors():
            index.add_with_ids(vecs, ids)
        return index

    def iter_vectors(self, chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of all rows in id order, streamed in chunks."""
        last = -1
        d = self.dim
        while True:
            rows = self.conn.execute(
                "SELECT id, vector FROM images WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)
            ).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), d)
            yield ids, vecs
            last = int(ids[-1])

    def vectors(self, ids: Iterable[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        got = dict(self._in_query("SELECT id, vector FROM images WHERE id IN ({})", ids))
        return (
            np.stack([np.frombuffer(got[i], dtype=np.float32) for i in ids])
            if ids
            else np.zeros((0, self.dim), np.float32)
        )

    def _in_query(self, sql: str, values: list[Any]) -> list[tuple]:
        out: list[tuple] = []
        for i in range(0, len(values), 900):
            part = values[i : i + 900]
            out += self.conn.execute(sql.format(",".join("?" * len(part))), part).fetchall()
        return out

    def rows(self, ids: Iterable[int]) -> dict[int, Row]:
        return {r[0]: Row(*r) for r in self._in_query(f"SELECT {_ROW_COLS} FROM images WHERE id IN ({{}})", list(ids))}

    def row_by_path(self, path: str) -> Row | None:
        r = self.conn.execute(f"SELECT {_ROW_COLS} FROM images WHERE path=?", (path,)).fetchone()
        return Row(*r) if r else None

    def all_rows(self) -> list[Row]:
        return [Row(*r) for r in self.conn.execute(f"SELECT {_ROW_COLS} FROM images ORDER BY id")]

    def rows_under(self, root: str) -> list[Row]:
        prefix = root.rstrip(os.sep) + os.sep
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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        index = self.faiss_index
        k = max(1, min(int(k), index.ntotal))
        if index.ntotal == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        return index.search(q, k)

    # ---- writing (caller holds the lock) -----------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        """Apply a group of changes atomically to SQLite, then mirror them into the in-memory FAISS index."""
        txn = Txn(self)
        index = self.faiss_index
        with self.conn:
            yield txn
            self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        if txn.removed:
            index.remove_ids(np.asarray(sorted(txn.removed), dtype=np.int64))
        if txn.added_ids:
            index.add_with_ids(
                np.ascontiguousarray(np.stack(txn.added_vecs), np.float32),
                np.asarray(txn.added_ids, np.int64),
            )

    def save(self) -> None:
        """Write the FAISS snapshot and the manifest atomically (after the rows they describe are committed)."""
        f = _faiss()
        data = f.serialize_index(self.faiss_index)  # a uint8 array, written and hashed without another copy
        atomic_write(self.path / FAISS_FILE, data)
        self.manifest.update(
            {
                **{k: v for k, v in self.signature.items()},
                "faiss_file": FAISS_FILE,
                "faiss_sha256": hashlib.sha256(data).hexdigest(),
                "generation": self.generation,
                "updated": _now(),
                "counts": {"images": self.count(), "failed": self.failed_count()},
            }
        )
        atomic_write(self.path / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode())

    def reset(self, signature: dict[str, Any]) -> None:
        """Drop every row and adopt a new signature in one transaction (used by --rebuild)."""
        with self.conn:
            self.conn.execute("DELETE FROM images")
            self.conn.execute("DELETE FROM failures")
            self.conn.execute("UPDATE meta SET value=? WHERE key='signature'", (json.dumps(signature, sort_keys=True),))
            self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        self._index = new_faiss_index(int(signature["dim"]))
        self.manifest["created"] = _now()
        self.save()


class Txn:
    """Changes staged inside `IndexStore.transaction()`."""

    def __init__(self, store: IndexStore) -> None:
        self.store = store
        self.conn = store.conn
        self.added_ids: list[int] = []
        self.added_vecs: list[np.ndarray] = []
        self.removed: set[int] = set()

    def insert(self, path: str, size: int, mtime_ns: int, sha256: str, width: int | None, height: int | None,
               vector: np.ndarray) -> int:  # fmt: skip
        v = np.ascontiguousarray(vector, dtype=np.float32)
        cur = self.conn.execute(
            "INSERT INTO images (path, size, mtime_ns, sha256, width, height, added_at, vector) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (path, size, mtime_ns, sha256, width, height, time.time(), v.tobytes()),
        )
        self.conn.execute("DELETE FROM failures WHERE path=?", (path,))
        rid = int(cur.lastrowid)
        self.added_ids.append(rid)
        self.added_vecs.append(v)
        return rid

    def replace_vector(self, rid: int, size: int, mtime_ns: int, sha256: str, width: int | None,
                       height: int | None, vector: np.ndarray) -> None:  # fmt: skip
        v = np.ascontiguousarray(vector, dtype=np.float32)
        self.conn.execute(
            "UPDATE images SET size=?, mtime_ns=?, sha256=?, width=?, height=?, vector=? WHERE id=?",
            (size, mtime_ns, sha256, width, height, v.tobytes(), rid),
        )
        self.removed.add(rid)
        self.added_ids.append(rid)
        self.added_vecs.append(v)

    def update_file(self, rid: int, path: str, size: int, mtime_ns: int) -> None:
        """A file whose content is unchanged: new path (moved) and/or new size/mtime; the vector stays."""
        self.conn.execute("UPDATE images SET path=?, size=?, mtime_ns=? WHERE id=?", (path, size, mtime_ns, rid))
        self.conn.execute("DELETE FROM failures WHERE path=?", (path,))

    def delete(self, rids: Iterable[int]) -> None:
        rids = [int(r) for r in rids]
        for i in range(0, len(rids), 900):
            part = rids[i : i + 900]
            self.conn.execute(f"DELETE FROM images WHERE id IN ({','.join('?' * len(part))})", part)
        self.removed.update(rids)

    def delete_paths(self, paths: Iterable[str]) -> None:
        ids = [r[0] for r in self.store._in_query("SELECT id FROM images WHERE path IN ({})", list(paths))]
        self.delete(ids)

    def fail(self, path: str, size: int, mtime_ns: int, error: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO failures (path, size, mtime_ns, error, seen_at) VALUES (?,?,?,?,?)",
            (path, size, mtime_ns, error, time.time()),
        )

    def forget_failures(self, paths: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM failures WHERE path=?", [(p,) for p in paths])


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
    except sqlite3.DatabaseError as e:
        raise IndexCorruptError(f"index database {path} is damaged ({e}); rebuild it with --rebuild") from e
    return conn
