"""Local features stored beside an index, keyed by file content (sha256), so moves and renames cost nothing.

`local-features.sqlite` in the index directory holds one compact record per distinct file content (see
`LocalFeatures.to_bytes`) and the extraction settings. Its presence means "keep local features in sync": every
`add_folder` extracts them for new or changed files and drops records no indexed file has any more. Records are
committed in batches, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import IndexCorruptError
from .local_features import MAX_FEATURES, MAX_SIDE, LocalFeatures, extract

FEATURES_DB = "local-features.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL);
"""


class FeatureStore:
    """The local-features database of one index directory."""

    def __init__(self, path: Path, conn: sqlite3.Connection, settings: dict[str, Any]) -> None:
        self.path = path
        self.conn = conn
        self.settings = settings

    @staticmethod
    def exists(index_dir: str | Path) -> bool:
        return (Path(index_dir) / FEATURES_DB).is_file()

    @classmethod
    def open(cls, index_dir: str | Path, create: bool = False) -> FeatureStore:
        path = Path(index_dir) / FEATURES_DB
        if not create and not path.is_file():
            raise FileNotFoundError(path)
        conn = sqlite3.connect(path, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=10000")
            with conn:
                conn.executescript(_SCHEMA)
                row = conn.execute("SELECT value FROM meta WHERE key='settings'").fetchone()
                if row is None:
                    settings = {"kind": "rootsift", "max_features": MAX_FEATURES, "max_side": MAX_SIDE}
                    conn.execute("INSERT INTO meta VALUES ('settings', ?)", (json.dumps(settings),))
                else:
                    settings = json.loads(row[0])
        except (sqlite3.DatabaseError, ValueError) as e:
            conn.close()
            raise IndexCorruptError(f"local features {path} are damaged ({e}); delete the file and re-index") from e
        return cls(path, conn, settings)

    def close(self) -> None:
        self.conn.close()

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def get(self, shas: Iterable[str]) -> dict[str, LocalFeatures]:
        """Stored features by sha256; missing or damaged records are simply absent."""
        shas = list(dict.fromkeys(shas))
        out: dict[str, LocalFeatures] = {}
        for a in range(0, len(shas), 500):
            chunk = shas[a : a + 500]
            q = f"SELECT sha256, data FROM features WHERE sha256 IN ({','.join('?' * len(chunk))})"
            for sha, data in self.conn.execute(q, chunk):
                try:
                    out[sha] = LocalFeatures.from_bytes(data)
                except (ValueError, TypeError):
                    continue
        return out

    def put(self, items: Iterable[tuple[str, LocalFeatures]]) -> None:
        with self.conn:
            self.conn.executemany(
                "INSERT OR REPLACE INTO features VALUES (?, ?)", ((s, f.to_bytes()) for s, f in items)
            )

    def keys(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT sha256 FROM features")}

    def delete(self, shas: Iterable[str]) -> int:
        shas = list(shas)
        with self.conn:
            self.conn.executemany("DELETE FROM features WHERE sha256=?", ((s,) for s in shas))
        return len(shas)

    def extract(self, source: Any) -> LocalFeatures:
        return extract(source, int(self.settings["max_features"]), int(self.settings["max_side"]))


def sync_features(
    index_dir: Path,
    rows: list[Any],
    progress: Callable[[int, int], None] | None = None,
    threads: int = 2,
    commit_seconds: float = 5.0,
) -> dict[str, int]:
    """Extract local features for indexed files that lack them and prune the rest; resumable (batched commits).

    `rows` are the index rows (path, sha256). Files that cannot be read now are counted, not fatal.
    """
    fs = FeatureStore.open(index_dir, create=True)
    try:
        have = fs.keys()
        pruned = fs.delete(have - {r.sha256 for r in rows})  # contents no indexed file has any more
        todo, seen = [], set(have)  # one file per content that has no features yet
        for r in rows:
            if r.sha256 not in seen and not r.sha256.startswith("vector:"):
                seen.add(r.sha256)
                todo.append(r)
        done = failed = 0
        pending: list[tuple[str, LocalFeatures]] = []
        last = time.monotonic()
        if progress:
            progress(0, len(todo))

        def one(row: Any) -> tuple[str, LocalFeatures | None]:
            try:
                return row.sha256, fs.extract(row.path)
            except Exception:  # unreadable now (moved, damaged): computed on demand later, never fatal
                return row.sha256, None

        try:
            with ThreadPoolExecutor(max(1, threads)) as pool:
                for a in range(0, len(todo), 32):  # small chunks: Ctrl-C waits for at most one
                    for sha, feats in pool.map(one, todo[a : a + 32]):
                        done += 1
                        if feats is None:
                            failed += 1
                        else:
                            pending.append((sha, feats))
                    if len(pending) >= 256 or time.monotonic() - last > commit_seconds:
                        fs.put(pending)
                        pending, last = [], time.monotonic()
                    if progress:
                        progress(done, len(todo))
        finally:
            fs.put(pending)
        return {"extracted": done - failed, "failed": failed, "pruned": pruned, "stored": len(fs)}
    finally:
        fs.close()
