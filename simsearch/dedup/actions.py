"""Dedup actions that can be undone: move duplicates to a folder, or "delete" them into a trash folder.

Every run writes an undo manifest (JSON, plus the removed index rows' vectors as .npy) before touching a file and
updates it after each move, so `simsearch undo MANIFEST` can put everything back, even after a crash. Files under a
--prefer folder and the kept file of each group are never touched. Permanent deletion needs its own flag.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..index.store import IndexStore, atomic_write
from .finder import DedupReport, is_preferred

ACTIONS = ("report", "move", "delete")


@dataclass
class Plan:
    """What an action would do: (source, destination) pairs; destination None means permanent deletion."""

    action: str
    moves: list[tuple[str, str | None]] = field(default_factory=list)
    kept: int = 0

    def to_json(self) -> list[dict[str, Any]]:
        return [{"from": s, "to": d} for s, d in self.moves]


def common_root(paths: list[str]) -> str:
    return os.path.commonpath(paths) if paths else "/"


def _free_name(dest: Path, taken: set[str]) -> Path:
    """`dest`, or `name-1.ext`, `name-2.ext`, ... : never overwrite an existing or planned file."""
    candidate, n = dest, 0
    while candidate.exists() or str(candidate) in taken:
        n += 1
        candidate = dest.with_name(f"{dest.stem}-{n}{dest.suffix}")
    return candidate


def plan_action(
    report: DedupReport,
    action: str,
    to: str | Path | None,
    store: IndexStore,
    prefer: list[str] = (),  # type: ignore[assignment]
    permanent: bool = False,
    include_similar: bool = False,
) -> Plan:
    """Which files go where. Moves keep the layout relative to the common folder of all indexed files. Only copies
    go, unless `include_similar`: then the other shots of a similar group go too (its best shot stays)."""
    if action not in ACTIONS:
        raise BadInputError(f"unknown action {action!r}; choose one of {', '.join(ACTIONS)}")
    if action == "report":
        return Plan(action)
    prefer = [os.path.abspath(os.path.expanduser(p)) for p in prefer]
    chosen = [g for g in report.groups if g.kind != "similar" or include_similar]
    losers = list(dict.fromkeys(f for g in chosen for f in g.files[1:] if not is_preferred(f, prefer)))
    plan = plan_files(losers, action, to, store, permanent)
    plan.kept = sum(len(g.files) for g in chosen) - len(losers)
    return plan


def plan_files(
    files: list[str], action: str, to: str | Path | None, store: IndexStore, permanent: bool = False
) -> Plan:
    """The plan for moving or trashing exactly `files` (the caller chose them), with `plan_action`'s destinations."""
    if action not in ("move", "delete"):
        raise BadInputError(f"unknown action {action!r}; choose move or delete")
    if action == "move" and to is None:
        raise BadInputError("--action move needs --to DIR")
    plan = Plan(action)
    root = common_root([r.path for r in store.all_rows()])
    if action == "move":
        base = Path(to).expanduser().absolute()
    else:
        base = store.path / "trash" / datetime.now().strftime("%Y%m%d-%H%M%S")
    taken: set[str] = set()
    for f in files:
        if action == "delete" and permanent:
            plan.moves.append((f, None))
            continue
        rel = os.path.relpath(f, root) if f.startswith(root) else f.lstrip(os.sep)
        dest = _free_name(base / rel, taken)
        taken.add(str(dest))
        plan.moves.append((f, str(dest)))
    return plan


def apply_plan(plan: Plan, store: IndexStore) -> Path | None:
    """Carry out a plan; returns the undo manifest path. Removes the moved files from the index."""
    if not plan.moves:
        return None
    undo_dir = store.path / "undo"
    undo_dir.mkdir(exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    manifest = undo_dir / f"{stamp}-{plan.action}.json"
    n = 1
    while manifest.exists():
        manifest = undo_dir / f"{stamp}-{plan.action}-{n}.json"
        n += 1
    rows = {r.path: r for r in store.all_rows()}
    moved_rows = [rows[s] for s, _ in plan.moves if s in rows]
    vec_file = manifest.with_suffix(".npy")
    vecs = store.vectors([r.id for r in moved_rows])
    with open(vec_file, "wb") as f:
        np.save(f, vecs)
        f.flush()
        os.fsync(f.fileno())
    entries = [
        {"from": s, "to": d, "done": False, "row": _row_json(rows.get(s)), "vector": i}
        for i, (s, d) in enumerate(plan.moves)
    ]
    doc = {
        "action": plan.action,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "index": str(store.path),
        "signature": store.signature,
        "vectors": vec_file.name,
        "entries": entries,
    }
    # Vector i belongs to the i-th entry that had an index row.
    k = 0
    for e in entries:
        if e["row"] is not None:
            e["vector"], k = k, k + 1
        else:
            e["vector"] = None
    _write(manifest, doc)
    done_paths = []
    last = time.monotonic()
    for e in entries:
        src, dst = e["from"], e["to"]
        if not os.path.exists(src):
            continue
        if dst is None:
            os.unlink(src)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.exists(dst):
                raise BadInputError(f"refusing to overwrite {dst}")
            shutil.move(src, dst)
        e["done"] = True
        done_paths.append(src)
        if time.monotonic() - last > 1.0:
            _write(manifest, doc)
            last = time.monotonic()
    _write(manifest, doc)
    held = store.holds_lock  # a caller that took the lock before the moves keeps it
    if not held:
        store.acquire_lock()
    try:
        with store.transaction() as txn:
            txn.delete_paths(done_paths)
        store.save()
    finally:
        if not held:
            store.release_lock()
    return manifest


def undo(manifest_path: str | Path) -> dict[str, Any]:
    """Move every file of an undo manifest back and re-add its index rows (vectors are kept, no re-embedding)."""
    mp = Path(manifest_path).expanduser()
    try:
        doc = json.loads(mp.read_text())
        entries = doc["entries"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"{mp} is not a simsearch undo manifest ({e})") from e
    restored, missing, permanent = [], [], 0
    for e in entries:
        if not e.get("done"):
            continue
        if e["to"] is None:
            permanent += 1
            continue
        if not os.path.exists(e["to"]):
            missing.append(e["to"])
            continue
        if os.path.exists(e["from"]):
            raise BadInputError(f"cannot restore {e['from']}: a file is already there")
        os.makedirs(os.path.dirname(e["from"]), exist_ok=True)
        shutil.move(e["to"], e["from"])
        e["done"] = False
        restored.append(e)
        _write(mp, doc)
    reindexed = _reinsert(doc, mp, restored)
    return {"restored": len(restored), "missing": missing, "permanently_deleted": permanent, "reindexed": reindexed}


def _reinsert(doc: dict[str, Any], mp: Path, restored: list[dict[str, Any]]) -> int:
    index = Path(doc.get("index", ""))
    if not restored or not IndexStore.exists(index):
        return 0
    vec_file = mp.with_name(doc["vectors"])
    vecs = np.load(vec_file) if vec_file.exists() else None
    store = IndexStore.open(index)
    try:
        if vecs is None or store.signature != doc.get("signature"):
            return 0
        store.acquire_lock()
        n = 0
        with store.transaction() as txn:
            for e in restored:
                r = e.get("row")
                if r is None or e.get("vector") is None or store.row_by_path(e["from"]) is not None:
                    continue
                st = os.stat(e["from"])
                txn.insert(e["from"], st.st_size, st.st_mtime_ns, r["sha256"], r["width"], r["height"],
                           vecs[e["vector"]])  # fmt: skip
                n += 1
        store.save()
        return n
    finally:
        store.close()


def _row_json(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"sha256": row.sha256, "width": row.width, "height": row.height}


def _write(path: Path, doc: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())
