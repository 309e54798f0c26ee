"""The action journal: kill -9 at any instant loses no file, undo replays only what simsearch recorded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.dedup import journal as journal_mod
from simsearch.dedup.actions import apply_plan, plan_files, undo, undo_list
from simsearch.index.store import IndexStore

runner = CliRunner()
SIG = {"backbone": "external", "weights": "external", "weights_digest": "external-test", "input_size": 0,
       "pooling": "external", "dim": 8, "fit": "external", "precision": "external"}  # fmt: skip


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_library(root: Path, n: int) -> tuple[Path, Path, dict[str, str]]:
    """n distinct small PNGs in nested folders and an index of them (vectors made up: no model needed); returns
    (folder, index, {path: sha256}) for byte-exact checks."""
    folder, index = root / "photos", root / "idx"
    rng = np.random.default_rng(0)
    files: dict[str, str] = {}
    for i in range(n):
        p = folder / f"y{i % 3}" / f"m{i % 7}" / f"img-{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(p)
        files[str(p)] = sha(p)
    store = IndexStore.create(index, SIG)
    store.acquire_lock()
    with store.transaction() as txn:
        for p, digest in files.items():
            st = os.stat(p)
            v = rng.standard_normal(8).astype(np.float32)
            txn.insert(p, st.st_size, st.st_mtime_ns, digest, 4, 4, v / np.linalg.norm(v))
    store.save()
    store.close()
    return folder, index, files


MOVER = """
import sys
from simsearch.dedup.actions import apply_plan, plan_files
from simsearch.index.store import IndexStore
index, action, to, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
with IndexStore.open(index) as store:
    plan = plan_files(files, action, None if to == "-" else to, store)
    print(apply_plan(plan, store), flush=True)
"""


def run_mover(index: Path, files: list[str], action: str = "delete", to: str = "-", fault: str | None = None):
    env = {**os.environ, journal_mod.FAULT_ENV: fault} if fault else dict(os.environ)
    return subprocess.run([sys.executable, "-c", MOVER, str(index), action, to, *files], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def assert_all_back(files: dict[str, str]) -> None:
    for p, digest in files.items():
        assert Path(p).is_file(), f"{p} was not put back"
        assert sha(Path(p)) == digest, f"{p} is not byte-exact"


def index_count(index: Path) -> int:
    with IndexStore.open(index) as store:
        return store.count()


@pytest.mark.parametrize("point", ["begun", "move:1", "move:37", "moved", "indexed"])
def test_kill_9_at_any_point_then_undo_restores_every_file(tmp_path: Path, point: str) -> None:
    folder, index, files = make_library(tmp_path, 60)
    victims = sorted(files)[::1][:50]
    r = run_mover(index, victims, fault=point)
    assert r.returncode == -signal.SIGKILL, r.stderr
    (manifest,) = (index / "undo").glob("*.json")
    gone = [p for p in victims if not Path(p).exists()]
    if point == "move:37":
        assert len(gone) == 37  # killed mid-way: 37 files moved, some not yet marked done in the journal
    out = runner.invoke(app, ["undo", str(manifest), "--json"])
    assert out.exit_code == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["restored"] == len(gone) and res["conflicts"] == [] and res["missing"] == []
    assert_all_back(files)
    assert index_count(index) == 60
    assert not list((index / "trash").rglob("*.png"))


@pytest.mark.parametrize(("point", "moved"), [("move:20", 20), ("indexed", 30)])
def test_after_a_crash_the_next_sync_recovers_first_and_drops_nothing(tmp_path: Path, point: str, moved: int) -> None:
    folder, index, files = make_library(tmp_path, 40)
    assert run_mover(index, sorted(files)[:30], fault=point).returncode == -signal.SIGKILL
    r = runner.invoke(app, ["index", str(folder), "--index", str(index), "--json"])
    assert r.exit_code == 0, r.stderr
    assert "recovered an interrupted delete" in r.stderr and f"{moved} files put back" in r.stderr
    rep = json.loads(r.stdout)
    assert rep["removed"] == 0 and rep["unchanged"] == 40 and rep["embedded"] == 0
    assert rep["recovered"][0]["restored"] == moved
    assert rep["recovered"][0]["reindexed"] == (moved if point == "indexed" else 0)  # rows gone only after moves
    assert_all_back(files)
    with journal_mod.Journal(index) as j:
        assert [a["state"] for a in j.actions()] == ["rolled-back"]
    assert undo_list(index) == []  # nothing left to undo


def test_kill_9_from_outside_at_a_random_instant(tmp_path: Path) -> None:
    folder, index, files = make_library(tmp_path, 1500)
    victims = sorted(files)[:1400]
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", MOVER, str(index), "delete", "-", *victims], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(not Path(p).exists() for p in victims[::50]) >= 3:  # some of it has moved
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone = sum(not Path(p).exists() for p in victims)
    assert gone > 0
    (manifest,) = (index / "undo").glob("*.json")
    res = undo(manifest)
    assert res["restored"] == gone and not res["conflicts"]
    assert_all_back(files)
    assert index_count(index) == 1500


def test_moves_across_devices_copy_verify_and_survive_a_kill(tmp_path: Path) -> None:
    dest_root = Path("/dev/shm")
    if not dest_root.is_dir() or os.stat(dest_root).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (/dev/shm) to move across")
    folder, index, files = make_library(tmp_path, 12)
    dest = dest_root / f"simsearch-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        victims = sorted(files)[:10]
        r = run_mover(index, victims, action="move", to=str(dest), fault="copied")
        assert r.returncode == -signal.SIGKILL
        assert Path(victims[0]).exists()  # copied and verified, not yet removed: both exist
        (manifest,) = (index / "undo").glob("*.json")
        assert undo(manifest)["conflicts"] == []
        assert_all_back(files)
        assert not list(dest.rglob("*.png"))  # the copy was removed, the original kept
        r = run_mover(index, victims, action="move", to=str(dest))
        assert r.returncode == 0, r.stderr
        moved = sorted(dest.rglob("*.png"))
        assert len(moved) == 10 and not any(Path(p).exists() for p in victims)
        assert sorted(sha(p) for p in moved) == sorted(files[p] for p in victims)
        res = undo(Path(r.stdout.strip()))
        assert res["restored"] == 10 and res["reindexed"] == 10
        assert_all_back(files)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_undo_refuses_manifests_it_did_not_record(tmp_path: Path) -> None:
    folder, index, files = make_library(tmp_path, 6)
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    (index / "undo").mkdir()
    crafted = index / "undo" / "20260101-000000-move.json"
    crafted.write_text(json.dumps({"action": "move", "entries": [
        {"from": str(tmp_path / "stolen.txt"), "to": str(outside), "done": True}]}))  # fmt: skip
    r = runner.invoke(app, ["undo", str(crafted)])
    assert r.exit_code == 1 and "not an action recorded in the journal" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert outside.read_text() == "not yours" and not (tmp_path / "stolen.txt").exists()
    elsewhere = tmp_path / "m.json"
    elsewhere.write_text(crafted.read_text())
    r = runner.invoke(app, ["undo", str(elsewhere)])
    assert r.exit_code == 1 and "not an undo manifest of a simsearch index" in r.stderr

    # a real manifest edited by hand: undo follows the journal, not the file
    victim = sorted(files)[0]
    with IndexStore.open(index) as store:
        manifest = apply_plan(plan_files([victim], "delete", None, store), store)
    doc = json.loads(manifest.read_text())
    doc["entries"][0]["to"] = str(outside)
    doc["entries"][0]["from"] = str(tmp_path / "stolen.txt")
    manifest.write_text(json.dumps(doc))
    assert undo(manifest)["restored"] == 1
    assert_all_back(files)
    assert outside.read_text() == "not yours" and not (tmp_path / "stolen.txt").exists()


def test_undo_moves_back_only_the_recorded_file_and_only_into_the_indexed_folders(tmp_path: Path) -> None:
    folder, index, files = make_library(tmp_path, 6)
    a, b = sorted(files)[:2]
    with IndexStore.open(index) as store:
        manifest = apply_plan(plan_files([a, b], "delete", None, store), store)
    with journal_mod.Journal(index) as j:
        (ea, eb) = j.entries(manifest.name)
    Path(ea.dst).write_bytes(b"replaced in the trash")  # type: ignore[arg-type]
    # the journal itself edited to send b outside the library: refused too
    with sqlite3.connect(index / journal_mod.JOURNAL_DB) as conn:
        conn.execute("UPDATE entries SET src=? WHERE seq=?", (str(tmp_path / "elsewhere" / "b.png"), eb.seq))
    res = undo(manifest)
    assert res["restored"] == 0 and len(res["conflicts"]) == 2
    reasons = sorted(c["reason"] for c in res["conflicts"])
    assert reasons == ["the file at the destination changed since it was moved",
                       "the original path is outside the folders this index covers"]  # fmt: skip
    assert not Path(a).exists() and not (tmp_path / "elsewhere").exists()
    assert Path(eb.dst).is_file()  # type: ignore[arg-type]


def test_undo_twice_restores_nothing_the_second_time_and_never_overwrites(tmp_path: Path) -> None:
    folder, index, files = make_library(tmp_path, 6)
    a, b = sorted(files)[:2]
    with IndexStore.open(index) as store:
        manifest = apply_plan(plan_files([a, b], "delete", None, store), store)
    Path(a).write_bytes(b"a new file at the old path")
    res = undo(manifest)
    assert res["restored"] == 1 and res["conflicts"][0]["reason"] == "another file is at the original path"
    assert Path(a).read_bytes() == b"a new file at the old path" and sha(Path(b)) == files[b]
    assert [x["undo"] for x in undo_list(index)] == [manifest.name]  # partly undone: can be finished later
    Path(a).unlink()
    res = undo(manifest)
    assert res["restored"] == 1 and not res["conflicts"]
    assert_all_back(files)
    assert undo(manifest)["restored"] == 0
    assert index_count(index) == 6


def test_cli_dedup_killed_mid_way_then_undo(photos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "lib"
    shutil.copytree(photos, folder)
    (folder / "copies").mkdir()
    for name in ("chelsea.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(folder / name, folder / "copies" / name)
    files = {str(p): sha(p) for p in folder.rglob("*.jpg")}
    index = tmp_path / "idx"
    assert runner.invoke(app, ["index", str(folder), "--index", str(index)]).exit_code == 0
    env = {**os.environ, journal_mod.FAULT_ENV: "move:2"}
    cmd = [sys.executable, "-m", "simsearch.cli", "dedup", "--index", str(index), "--exact-only", "--action",
           "delete", "--yes"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert sum(not Path(p).exists() for p in files) == 2
    (manifest,) = (index / "undo").glob("*.json")
    out = runner.invoke(app, ["undo", str(manifest)])
    assert out.exit_code == 0 and "restored 2 files" in out.stdout
    assert_all_back(files)
    assert index_count(index) == len(files)


def test_the_server_rolls_back_on_start_and_moves_across_devices_by_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simsearch.serve.state import ServeState

    folder, index, files = make_library(tmp_path, 10)
    assert run_mover(index, sorted(files)[:6], fault="move:3").returncode == -signal.SIGKILL
    ServeState(index).close()  # a writable server recovers when it starts
    assert_all_back(files)
    monkeypatch.setattr(journal_mod, "FORCE_COPY", True)
    with IndexStore.open(index) as store:
        manifest = apply_plan(plan_files(sorted(files)[:4], "delete", None, store), store)
    with journal_mod.Journal(index) as j:
        entries = j.entries(manifest.name)
    assert all(e.state == "moved" and e.sha256 == files[e.src] for e in entries)  # copied and verified
    assert sorted(sha(Path(e.dst)) for e in entries) == sorted(files[e.src] for e in entries)  # type: ignore[arg-type]
    res = undo(manifest)
    assert res["restored"] == 4 and res["reindexed"] == 4
    assert_all_back(files)


UNDOER = """
import sys
from simsearch.dedup.actions import undo
print(undo(sys.argv[1]))
"""


def test_undo_killed_mid_way_is_finished_by_the_next_undo(tmp_path: Path) -> None:
    folder, index, files = make_library(tmp_path, 12)
    with IndexStore.open(index) as store:
        manifest = apply_plan(plan_files(sorted(files)[:8], "delete", None, store), store)
    env = {**os.environ, journal_mod.FAULT_ENV: "undo:3"}
    r = subprocess.run([sys.executable, "-c", UNDOER, str(manifest)], env=env, capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    assert sum(Path(p).exists() for p in files) == 4 + 3  # three back, not yet marked nor re-indexed
    res = undo(manifest)
    assert res["restored"] == 5 and not res["conflicts"]
    assert_all_back(files)
    assert index_count(index) == 12  # the three put back before the kill got their rows too


def test_an_error_part_way_puts_everything_back(tmp_path: Path) -> None:
    folder, index, files = make_library(tmp_path, 10)
    victims = sorted(files)[:6]
    with IndexStore.open(index) as store:
        plan = plan_files(victims, "delete", None, store)
        intruder = Path(plan.moves[3][1])  # type: ignore[arg-type]
        intruder.parent.mkdir(parents=True, exist_ok=True)
        intruder.write_bytes(b"appeared after the plan")
        with pytest.raises(Exception, match="refusing to overwrite"):
            apply_plan(plan, store)
    assert_all_back(files)
    assert intruder.read_bytes() == b"appeared after the plan"
    assert index_count(index) == 10
    with journal_mod.Journal(index) as j:
        assert [a["state"] for a in j.actions()] == ["rolled-back"]
