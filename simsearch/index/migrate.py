"""Upgrade an index of format 1 (vectors as SQLite blobs plus a full FAISS copy) to format 2 in place.

Nothing is re-embedded: the blobs are written to the vector file and dropped from the database. The database
change is one transaction and the manifest is replaced last, so an interrupted upgrade starts again cleanly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexCorruptError


def migrate_v1(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Convert the index at `path` (holding its writer lock meanwhile) and return the new manifest."""
    from .store import DATABASE, MANIFEST, VECTORS_FILE, IndexStore, _connect, atomic_write, vector_crc

    dim = int(manifest["dim"])
    conn = _connect(path / DATABASE)
    probe = IndexStore.__new__(IndexStore)  # only for its lock
    probe.path, probe._lock_fd = path, None
    probe.acquire_lock()
    try:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(images)")}
        vec_path = path / VECTORS_FILE
        if "vector" in cols:
            rows = conn.execute("SELECT id, vector FROM images ORDER BY id").fetchall()
            top = max((r[0] for r in rows), default=0)
            vecs = np.zeros((top + 1, dim), np.float32)
            crcs = {}
            for rid, blob in rows:
                v = np.frombuffer(blob, dtype=np.float32)
                if v.shape != (dim,):
                    raise IndexCorruptError(f"index {path}: row {rid} has a damaged vector; rebuild with --rebuild")
                vecs[rid] = v
                crcs[rid] = vector_crc(v)
            tmp = vec_path.with_name(f".{VECTORS_FILE}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(vecs.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, vec_path)
            with conn:
                conn.execute(
                    "CREATE TABLE images2 (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE, "
                    "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, width INTEGER, "
                    "height INTEGER, added_at REAL NOT NULL, vcrc INTEGER NOT NULL)"
                )
                conn.executemany(
                    "INSERT INTO images2 SELECT id, path, size, mtime_ns, sha256, width, height, added_at, ? "
                    "FROM images WHERE id=?",
                    [(crc, rid) for rid, crc in crcs.items()],
                )
                conn.execute("DROP TABLE images")
                conn.execute("ALTER TABLE images2 RENAME TO images")
                conn.execute("CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256)")
            conn.execute("VACUUM")
        elif not vec_path.is_file():
            raise IndexCorruptError(f"index {path} is half upgraded and {VECTORS_FILE} is missing; use --rebuild")
        new = {k: v for k, v in manifest.items() if k not in ("faiss_index", "faiss_file", "faiss_sha256")}
        new.update({"version": 2, "index_type": "auto", "memory_budget": None, "vectors_file": VECTORS_FILE,
                    "search": {"kind": "flat", "factory": None}, "generation": -1,
                    "vectors_slots": vec_path.stat().st_size // (4 * dim)})  # fmt: skip
        atomic_write(path / MANIFEST, (json.dumps(new, indent=2) + "\n").encode())
        (path / "vectors.faiss").unlink(missing_ok=True)
        return new
    finally:
        probe.release_lock()
        conn.close()
