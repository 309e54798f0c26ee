"""Dedup actions that can be undone: move duplicates to a folder, or "delete" them into a trash folder.

Every run is recorded in the index's write-ahead journal (`journal.py`) before a file is touched, and named by an undo
manifest in `undo/` that `simsearch undo MANIFEST` replays; a run cut short by a crash is rolled back by the next
writer. Files under a --prefer folder and the kept file of each group are never touched. Permanent deletion needs its
own flag.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from ..index.store import IndexStore, atomic_write
from ..sources import is_url
from .finder import DedupReport, is_preferred
from .journal import (
    JOURNAL_DB,
    MARK_EVERY,
    Entry,
    Journal,
    copy_verified,
    fault,
    identity,
    recover,
    recovery_message,
    rename_noreplace,
    replay_undo,
    same_device,
    store_roots,
)

log = logging.getLogger("simsearch")

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
    remote = next((f for f in files if is_url(f)), None)
    if remote is not None:
        raise BadInputError(f"{remote} is in object storage: dedup reports such files but does not move or delete them")
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
    """Carry out a plan under the writer lock; returns the undo manifest's path. Removes the moved files' index rows.

    The whole plan is recorded in the index's journal (durably) before the first file moves, and files are marked
    done in batches, so a crash at any instant leaves nothing unaccounted for: the next writer rolls it back.
    """
    if not plan.moves:
        return None
    held = store.holds_lock  # a caller that took the lock before planning keeps it
    if not held:
        store.acquire_lock()
    try:
        for line in recovery_message(recover(store)):
            log.warning("simsearch: %s", line)
        with Journal(store.path) as journal:
            return _apply(plan, store, journal)
    finally:
        if not held:
            store.release_lock()


def _apply(plan: Plan, store: IndexStore, journal: Journal) -> Path:
    name = journal.new_name(plan.action)
    rows = store.rows_by_path([s for s, _ in plan.moves])
    indexed = list(rows.values())
    vec_of = {r.path: i for i, r in enumerate(indexed)}
    entries: list[Entry] = []
    for seq, (src, dst) in enumerate(plan.moves):
        try:
            st = os.lstat(src)
        except OSError:
            entries.append(Entry(seq, src, dst, "absent"))
            continue
        r = rows.get(src)
        if r is None:
            entries.append(Entry(seq, src, dst, "planned", *identity(st)))
            continue
        known = (r.size, r.mtime_ns) == (st.st_size, st.st_mtime_ns)
        entries.append(Entry(seq, src, dst, "planned", *identity(st), r.sha256 if known else None, r.sha256,
                             r.width, r.height, vec_of[src]))  # fmt: skip
    roots = store_roots(store) or [common_root([r.path for r in store.all_rows()])]
    journal.begin(name, plan.action, entries, roots, store.signature, store.vectors([r.id for r in indexed]))
    undo_dir = store.path / "undo"
    undo_dir.mkdir(exist_ok=True)
    manifest = undo_dir / name
    _write_manifest(manifest, plan.action, store, entries)
    fault("begun")
    try:
        _run(store, journal, name, entries)
    except BaseException:
        # an error (not a crash) part way: put back what moved, so nothing is left half done and running
        res = replay_undo(journal, store, name)
        journal.set_state(name, "rolled-back" if not res["conflicts"] else "partly-undone")
        _write_manifest(manifest, plan.action, store, journal.entries(name))
        raise
    _write_manifest(manifest, plan.action, store, entries)
    return manifest


def _run(store: IndexStore, journal: Journal, name: str, entries: list[Entry]) -> None:
    """The moves, their marks, then the index update; the action is done at the end."""
    changes: list[tuple[int, str, str | None]] = []
    last = time.monotonic()
    n = 0
    devices: dict[str, int] = {}  # destination folder -> its device, made once
    for e in entries:
        if e.state != "planned":
            continue
        state, sha = _move_one(e, journal, name, devices)
        e.state = state
        n += 1
        fault(f"move:{n}")
        changes.append((e.seq, state, sha))
        if len(changes) >= MARK_EVERY or time.monotonic() - last > 1.0:
            journal.mark(name, changes)
            changes, last = [], time.monotonic()
    journal.mark(name, changes)
    fault("moved")
    with store.transaction() as txn:
        txn.delete_paths([e.src for e in entries if e.state in ("moved", "deleted")])
    store.save()
    fault("indexed")
    journal.set_state(name, "done")


def _move_one(e: Entry, journal: Journal, name: str, devices: dict[str, int]) -> tuple[str, str | None]:
    """Move, trash or delete one recorded file; returns its new state and, for a copy across devices, its hash."""
    if e.dst is None:
        os.unlink(e.src)
        return "deleted", None
    parent = os.path.dirname(e.dst)
    if parent not in devices:
        os.makedirs(parent, exist_ok=True)
        devices[parent] = os.stat(parent).st_dev
    if same_device(devices[parent], e.dev):  # type: ignore[arg-type]
        try:
            rename_noreplace(e.src, e.dst)
        except FileExistsError:
            raise BadInputError(f"refusing to overwrite {e.dst}") from None
        return "moved", None
    if os.path.lexists(e.dst):
        raise BadInputError(f"refusing to overwrite {e.dst}")
    digest = copy_verified(e.src, e.dst)
    journal.mark(name, [(e.seq, "planned", digest)])  # the copy's hash is durable before the original goes
    fault("copied")
    os.unlink(e.src)
    return "moved", digest


def undo(manifest_path: str | Path) -> dict[str, Any]:
    """Move every file of an action back and re-add its index rows (vectors from the journal, no re-embedding).

    `manifest_path` names the action: a manifest in an index's `undo/` folder. Only actions recorded in that index's
    journal are replayed; anything else is refused before a file moves.
    """
    mp = Path(manifest_path).expanduser().absolute()
    index = mp.parent.parent
    if mp.parent.name != "undo" or not IndexStore.exists(index):
        raise BadInputError(f"{mp} is not an undo manifest of a simsearch index (expected INDEX/undo/NAME.json)")
    refusal = f"{mp.name} is not an action recorded in the journal of {index}; nothing was moved"
    if not Journal.exists(index):
        raise BadInputError(refusal)
    with IndexStore.open(index) as store, Journal(index) as journal:
        if journal.action(mp.name) is None:
            raise BadInputError(refusal)
        act = journal.action(mp.name) or {}
        store.acquire_lock()
        recovered = recover(store)  # a crash-interrupted action, this one included, is rolled back first
        mine = next((r for r in recovered if r["undo"] == mp.name), None)
        for line in recovery_message([r for r in recovered if r is not mine]):
            log.warning("simsearch: %s", line)
        res = {k: v for k, v in mine.items() if k not in ("undo", "action")} if mine else replay_undo(
            journal, store, mp.name)  # fmt: skip
        _write_manifest(mp, act.get("action", ""), store, journal.entries(mp.name))
    return res


def undo_list(index_path: str | Path) -> list[dict[str, Any]]:
    """The actions of an index that can be undone, newest first (from its journal)."""
    if not Journal.exists(index_path):
        return []
    with Journal(index_path) as journal:
        return journal.actions(states=["done", "partly-undone"])


def _write_manifest(path: Path, action: str, store: IndexStore, entries: list[Entry]) -> None:
    """The human-readable record of an action (its name is what `undo` takes); the journal is the source of truth."""
    doc = {
        "action": action,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "index": str(store.path),
        "journal": JOURNAL_DB,
        "entries": [{"from": e.src, "to": e.dst, "done": e.state in ("moved", "deleted")} for e in entries],
    }
    atomic_write(path, (json.dumps(doc, separators=(",", ":")) + "\n").encode())  # compact: the C encoder
