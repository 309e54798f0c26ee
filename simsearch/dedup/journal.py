"""The write-ahead journal of file actions (move, trash, delete) of one index, and the replay that undoes them.

Every action is recorded in `journal.sqlite` in the index folder before the first file is touched: each file's
source and destination, its identity (device, inode, size, mtime) and its index row with the vector. The record is
durable (SQLite in WAL mode with synchronous=FULL, and an fsync of the folder when the journal is created). Files are
then marked done in batches; the marks only save work, since where a file is can always be read from the disk and
checked against the recorded identity. So after a kill -9 at any instant the journal knows every file that may have
moved, and an interrupted action is rolled back the next time the index is opened for writing.

The journal, not the JSON manifest in `undo/`, is the source of truth: undo replays only actions recorded here, moves a
file back only when it is still the file that was moved, and only into the folders the index covers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
from collections.abc import Iterable
from dataclasses import astuple, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError, IndexCorruptError
from ..index.store import IndexStore, _fsync_dir

JOURNAL_DB = "journal.sqlite"
VECTORS_DIR = "journal"  # per action: the index rows' vectors, for undo to put them back without re-embedding
PARTIAL = ".simsearch-partial"  # suffix of a file being copied across devices
MARK_EVERY = 4096  # entries marked done per journal commit (at least once a second)
FAULT_ENV = "SIMSEARCH_FAULT"  # tests: kill -9 this process at a named point (see `fault`)
FORCE_COPY = False  # tests: move by copy + verify + unlink even on one file system

_SCHEMA = """
CREATE TABLE IF NOT EXISTS actions (
    name TEXT PRIMARY KEY,      -- the undo manifest's file name
    action TEXT NOT NULL,       -- move | delete
    created TEXT NOT NULL,
    state TEXT NOT NULL,        -- running | done | undone | partly-undone | rolled-back
    roots TEXT NOT NULL,        -- JSON list: the folders files may be moved back into
    signature TEXT NOT NULL,    -- the index's model signature, for re-adding rows
    process TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    action TEXT NOT NULL,
    seq INTEGER NOT NULL,
    src TEXT NOT NULL,
    dst TEXT,                   -- NULL: deleted for good
    state TEXT NOT NULL,        -- planned | moved | deleted | absent | restored | conflict
    dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER,
    sha256 TEXT,                -- content hash, known for rows and for copies across devices
    row_sha TEXT, width INTEGER, height INTEGER,  -- the index row, NULL when the file was not indexed
    vec INTEGER,                -- the row's vector: its row in journal/NAME.npy
    PRIMARY KEY (action, seq)
);
"""


def fault(point: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process when SIMSEARCH_FAULT names `point`."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Entry:
    seq: int
    src: str
    dst: str | None
    state: str
    dev: int | None = None
    ino: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    row_sha: str | None = None
    width: int | None = None
    height: int | None = None
    vec: int | None = None


class Journal:
    """`journal.sqlite` of one index. Writers hold the index's writer lock while they use it."""

    def __init__(self, index_path: str | Path) -> None:
        self.index_path = Path(index_path).absolute()
        path = self.index_path / JOURNAL_DB
        new = not path.exists()
        try:
            self.conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA busy_timeout=10000")
            with self.conn:
                self.conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise IndexCorruptError(f"the action journal {path} is damaged ({e})") from e
        if new:
            _fsync_dir(self.index_path)

    @staticmethod
    def exists(index_path: str | Path) -> bool:
        return (Path(index_path) / JOURNAL_DB).is_file()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- recording -------------------------------------------------------------------------------------------
    def new_name(self, action: str) -> str:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name, n = f"{stamp}-{action}.json", 1
        while self.action(name) is not None or (self.index_path / "undo" / name).exists():
            name, n = f"{stamp}-{action}-{n}.json", n + 1
        return name

    def begin(
        self, name: str, action: str, entries: list[Entry], roots: list[str], signature: dict, vectors: np.ndarray
    ) -> None:
        """Record a whole action, durably, before any of its files is touched; `vectors` are the index rows'
        (entry.vec indexes them), kept in a file of their own: a blob per row made the journal 4x slower."""
        folder = self.index_path / VECTORS_DIR
        folder.mkdir(exist_ok=True)
        vfile = folder / (Path(name).stem + ".npy")
        with open(vfile, "wb") as f:
            np.save(f, np.ascontiguousarray(vectors, np.float32))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(folder)
        proc = f"process {os.getpid()} on {socket.gethostname()}"
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self.conn:
            self.conn.execute(
                "INSERT INTO actions VALUES (?,?,?,?,?,?,?)",
                (name, action, created, "running", json.dumps(roots), json.dumps(signature, sort_keys=True), proc),
            )
            self.conn.executemany(
                "INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(name, *astuple(e)) for e in entries],
            )

    def mark(self, name: str, changes: Iterable[tuple[int, str, str | None]]) -> None:
        """Set (seq, state, sha256-or-None) of entries in one durable commit."""
        with self.conn:
            self.conn.executemany(
                "UPDATE entries SET state=?, sha256=COALESCE(?, sha256) WHERE action=? AND seq=?",
                [(state, sha, name, seq) for seq, state, sha in changes],
            )

    def set_state(self, name: str, state: str) -> None:
        with self.conn:
            self.conn.execute("UPDATE actions SET state=? WHERE name=?", (state, name))

    # ---- reading ---------------------------------------------------------------------------------------------
    def action(self, name: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT name, action, created, state, roots, signature, process FROM actions WHERE name=?", (name,)
        ).fetchone()
        if row is None:
            return None
        keys = ("name", "action", "created", "state", "roots", "signature", "process")
        out = dict(zip(keys, row, strict=True))
        out["roots"], out["signature"] = json.loads(out["roots"]), json.loads(out["signature"])
        return out

    def actions(self, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Actions newest first, with their file counts; only those in `states` when given."""
        rows = self.conn.execute(
            "SELECT a.name, a.action, a.created, a.state, COUNT(e.seq), "
            "SUM(e.state IN ('moved', 'deleted')) FROM actions a LEFT JOIN entries e ON e.action = a.name "
            "GROUP BY a.name ORDER BY a.created DESC, a.name DESC"
        ).fetchall()
        want = set(states) if states is not None else None
        return [
            {"undo": n, "action": a, "created": c, "state": s, "files": int(f), "done": int(d or 0)}
            for n, a, c, s, f, d in rows
            if want is None or s in want
        ]

    def entries(self, name: str) -> list[Entry]:
        rows = self.conn.execute(
            "SELECT seq, src, dst, state, dev, ino, size, mtime_ns, sha256, row_sha, width, height, vec FROM entries "
            "WHERE action=? ORDER BY seq",
            (name,),
        ).fetchall()
        return [Entry(*r) for r in rows]

    def vectors(self, name: str, dim: int) -> np.ndarray | None:
        """The index rows' vectors of an action (memory-mapped), or None when their file is missing or not whole."""
        try:
            v = np.load(self.index_path / VECTORS_DIR / (Path(name).stem + ".npy"), mmap_mode="r", allow_pickle=False)
        except Exception:  # missing, empty (EOFError), truncated or not an array: the next sync embeds again
            return None
        return v if v.ndim == 2 and v.shape[1] == dim and v.dtype == np.float32 else None


# ---- moving files ----------------------------------------------------------------------------------------------
def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def same_device(dev_a: int, dev_b: int) -> bool:
    """Whether a rename between the two devices works (tests set FORCE_COPY to take the copy path on one device)."""
    return dev_a == dev_b and not FORCE_COPY


def rename_noreplace(src: str, dst: str) -> None:
    """Rename on one file system without ever replacing a file at `dst` (FileExistsError instead): a hard link then
    an unlink, which the kernel refuses atomically when `dst` exists; where links are not supported (some network
    and FAT file systems), a check then os.replace."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "file exists", dst) from None
        os.replace(src, dst)
        return
    os.unlink(src)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def copy_verified(src: str, dst: str) -> str:
    """Copy `src` to `dst` across devices without ever leaving a partial file at `dst`: write `dst` + PARTIAL,
    fsync, read it back and compare hashes, keep the times, then rename into place; returns the content's sha256.
    Refuses to replace an existing `dst`."""
    part = dst + PARTIAL
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(part, "wb") as fo:
        while chunk := fi.read(1 << 20):
            h.update(chunk)
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    digest = h.hexdigest()
    if sha256_file(part) != digest:
        os.unlink(part)
        raise OSError(f"copy of {src} to {dst} does not read back the same; left the original in place")
    shutil.copystat(src, part)
    if os.path.lexists(dst):
        os.unlink(part)
        raise FileExistsError(f"refusing to overwrite {dst}")
    os.replace(part, dst)
    _fsync_dir(Path(dst).parent)
    return digest


def place_back(e: Entry, allowed: list[str]) -> str:
    """Put one moved file back at its source path, never overwriting a file; returns what happened.

    'restored': moved back, byte-exact (the same inode renamed, or a copy read back and compared); 'untouched': the
    original is still at its source (an interrupted action had not reached it); 'absent': neither path holds it;
    'conflict': the file at the destination is not the one the journal recorded, another file took the source path,
    or the source lies outside the folders the index covers.
    """
    assert e.dst is not None
    for part in (e.dst + PARTIAL, e.src + PARTIAL):
        if _lstat(part) is not None:
            os.unlink(part)  # a copy across devices cut short (either way): its source was never removed
    src_st, dst_st = _lstat(e.src), _lstat(e.dst)
    if src_st is not None:
        if identity(src_st) == (e.dev, e.ino, e.size, e.mtime_ns):
            if dst_st is not None and _same_file(e.src, src_st, e.dst, dst_st):
                os.unlink(e.dst)  # copied or linked, the source not yet removed: the source is the original
            return "untouched"
        if dst_st is not None and _is_ours(e, dst_st):
            if _same_file(e.dst, dst_st, e.src, src_st):
                os.unlink(e.dst)  # copied back across devices, cut short before the copy in the trash went
                return "restored"
            return "conflict"
        return "untouched" if e.state == "planned" else "absent"
    if dst_st is None:
        return "absent"
    if not _is_ours(e, dst_st) or not inside(e.src, allowed):
        return "conflict"
    parent = os.path.dirname(e.src)
    os.makedirs(parent, exist_ok=True)
    if same_device(dst_st.st_dev, os.stat(parent).st_dev):
        try:
            rename_noreplace(e.dst, e.src)
        except FileExistsError:
            return "conflict"
    else:
        copy_verified(e.dst, e.src)
        os.unlink(e.dst)
    return "restored"


def _same_file(a: str, a_st: os.stat_result, b: str, b_st: os.stat_result) -> bool:
    """Whether `b` is a second name or a complete copy of `a`."""
    if (a_st.st_dev, a_st.st_ino) == (b_st.st_dev, b_st.st_ino):
        return True
    if not stat.S_ISREG(b_st.st_mode) or a_st.st_size != b_st.st_size:
        return False
    return sha256_file(a) == sha256_file(b)


def _is_ours(e: Entry, st: os.stat_result) -> bool:
    """Whether the file with stat `st` at the destination is the one this entry moved there."""
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        return False
    if identity(st) == (e.dev, e.ino, e.size, e.mtime_ns):
        return True  # renamed on one file system: the very same inode
    if stat.S_ISLNK(st.st_mode) or st.st_size != e.size:
        return False
    if e.sha256 is not None:  # copied across devices: the same bytes
        return sha256_file(e.dst) == e.sha256  # type: ignore[arg-type]
    return abs(st.st_mtime_ns - (e.mtime_ns or 0)) <= 2_000_000_000  # FAT and exFAT keep times to 2 s


def inside(path: str, roots: list[str]) -> bool:
    """Whether `path` (its folder resolved, so no symlinked folder leads out) lies under one of `roots`."""
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    return any(real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def replay_undo(journal: Journal, store: IndexStore | None, name: str) -> dict[str, Any]:
    """Move every file of action `name` back and re-add its index rows; the caller holds the writer lock.

    Works for finished actions and for ones a crash interrupted (then it is the roll-back). Files are checked one by
    one: a file that changed at its destination, or whose source path is taken, stays where it is and is reported.
    """
    act = journal.action(name)
    if act is None:
        raise BadInputError(f"{name} is not an action recorded in the journal of {journal.index_path}")
    allowed = [os.path.realpath(r) for r in act["roots"]]
    if store is not None:
        allowed += store_roots(store)
    restored: list[Entry] = []
    missing: list[str] = []
    conflicts: list[dict[str, str]] = []
    permanent = 0
    changes: list[tuple[int, str, str | None]] = []
    for e in journal.entries(name):
        if e.state in ("restored", "absent", "untouched"):
            continue
        if e.dst is None:
            permanent += e.state == "deleted" or (e.state == "planned" and _lstat(e.src) is None)
            continue
        try:
            state = place_back(e, allowed)
        except OSError as err:
            state = "conflict"
            conflicts.append({"path": e.src, "at": e.dst, "reason": f"cannot move it back: {err.strerror or err}"})
        else:
            if state == "restored":
                restored.append(e)
                fault(f"undo:{len(restored)}")
            elif state == "absent":
                missing.append(e.dst)
            elif state == "conflict":
                conflicts.append({"path": e.src, "at": e.dst, "reason": _conflict_reason(e, allowed)})
        if state != "conflict":
            changes.append((e.seq, state, None))
        if len(changes) >= MARK_EVERY:
            journal.mark(name, changes)
            changes = []
    journal.mark(name, changes)
    reindexed = _reinsert(journal, store, act) if store is not None else 0
    journal.set_state(name, "undone" if not conflicts else "partly-undone")
    return {"restored": len(restored), "missing": missing, "conflicts": conflicts, "permanently_deleted": permanent,
            "reindexed": reindexed}  # fmt: skip


def _conflict_reason(e: Entry, allowed: list[str]) -> str:
    if _lstat(e.src) is not None:
        return "another file is at the original path"
    if not inside(e.src, allowed):
        return "the original path is outside the folders this index covers"
    return "the file at the destination changed since it was moved"


def store_roots(store: IndexStore) -> list[str]:
    """The folders the index covers (recorded by sync and import); empty for an index that never recorded any."""
    roots = getattr(store, "roots", None)
    return [os.path.realpath(r) for r in roots] if roots else []


def _reinsert(journal: Journal, store: IndexStore, act: dict[str, Any]) -> int:
    """Index rows back, from the journal's vectors (no re-embedding), for every file of the action that is at its
    source again as it was (size and mtime) and has no row: those restored now, and those a crash cut off between
    moving back and re-adding (so running undo again finishes the job)."""
    if store.signature != act["signature"]:
        return 0
    todo = []
    for e in journal.entries(act["name"]):
        if e.vec is None or e.dst is None:
            continue
        st = _lstat(e.src)
        if st is not None and (st.st_size, st.st_mtime_ns) == (e.size, e.mtime_ns) and not store.row_by_path(e.src):
            todo.append(e)
    vectors = journal.vectors(act["name"], store.dim) if todo else None
    if vectors is None:
        return 0  # the next sync embeds these files again
    n = 0
    with store.transaction() as txn:
        for e in todo:
            try:
                st = os.stat(e.src)
            except OSError:
                continue
            if e.vec >= len(vectors):  # type: ignore[operator]
                continue
            txn.insert(e.src, st.st_size, st.st_mtime_ns, e.row_sha, e.width, e.height, vectors[e.vec])
            n += 1
    store.save()
    return n


def recover(store: IndexStore) -> list[dict[str, Any]]:
    """Roll back every action a crash left running; the caller holds the writer lock (so no live process runs
    one). Returns what was done per action, for the caller to say."""
    if not Journal.exists(store.path):
        return []
    with Journal(store.path) as journal:
        out = []
        for a in journal.actions(states=["running"]):
            res = replay_undo(journal, store, a["undo"])
            journal.set_state(a["undo"], "rolled-back" if not res["conflicts"] else "partly-undone")
            out.append({"undo": a["undo"], "action": a["action"], **res})
        return out


def recovery_message(done: list[dict[str, Any]]) -> list[str]:
    """One line per rolled-back action, for the CLI and the server log."""
    lines = []
    for r in done:
        extra = ""
        if r["conflicts"]:
            extra = f"; {len(r['conflicts'])} left where they are (see `simsearch undo --json`)"
        lines.append(f"recovered an interrupted {r['action']} ({r['undo']}): {r['restored']} files put back at their "
                     f"original paths, {r['reindexed']} index entries restored{extra}")  # fmt: skip
    return lines
