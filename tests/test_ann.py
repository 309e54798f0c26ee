"""Index types: recall after tuning, exact scores, switching as the collection grows, removal, readers during
writes, vectors stored once, adding and searching external vectors, import, and the format-1 upgrade."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simsearch.api import SimIndex
from simsearch.cli import app
from simsearch.errors import BadInputError
from simsearch.index import ann
from simsearch.index.store import IndexStore

DIM = 64
SIG = {"backbone": "external", "weights": "external", "weights_digest": "x", "input_size": 0,
       "pooling": "external", "dim": DIM, "fit": "external", "precision": "external"}  # fmt: skip


def clustered(n: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Unit vectors around `clusters` centres at varied spreads: the shape of real embedding collections."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    x = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, DIM)) * rng.uniform(0.3, 1.0, (n, 1))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make(tmp_path: Path, index_type: str, n: int, seed: int = 0) -> tuple[SimIndex, np.ndarray, list[str]]:
    idx = SimIndex(IndexStore.create(tmp_path / f"idx-{index_type.replace(',', '_')}", SIG, index_type=index_type))
    vecs = clustered(n + 100, seed)[:n]  # the last 100 of the same collection are fresh queries (see fresh())
    paths = [f"/nowhere/{i:06d}.jpg" for i in range(n)]
    idx.add_vectors(paths, vecs)
    return idx, vecs, paths


def fresh(n: int, seed: int = 0) -> np.ndarray:
    """100 vectors of the same collection as make(tmp, type, n, seed) that are not in the index."""
    return clustered(n + 100, seed)[n:]


def exact_top(vecs: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ vecs.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("index_type", ["flat", "ivf", "ivfpq", "hnsw"])
def test_each_type_reaches_the_recall_target_with_exact_scores(tmp_path: Path, index_type: str) -> None:
    idx, vecs, paths = make(tmp_path, index_type, 6000)
    search = idx.store.manifest["search"]
    assert search["kind"] == index_type
    if index_type != "flat":
        assert search["recall_at_10"] >= ann.TARGET_RECALL and search["value"] >= 1
        assert (idx.store.path / search["file"]).is_file() and search["file"].startswith("search-")
    q = fresh(6000)
    got = idx.search_vectors(q, k=10)
    truth = exact_top(vecs, q, 10)
    pos = {p: i for i, p in enumerate(paths)}
    recall = np.mean([len({pos[m.path] for m in g} & set(t.tolist())) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.93, recall  # tuned on stored vectors, checked on fresh queries
    for g, qq in zip(got[:5], q[:5], strict=True):  # scores are exact cosines, best first
        s = np.array([m.score for m in g])
        assert np.all(np.diff(s) <= 1e-7)
        assert np.allclose(s, [float(vecs[paths.index(m.path)] @ qq) for m in g], atol=1e-5)
    exact = idx.search_vectors(q[:3], k=10, exact=True)
    assert [[m.path for m in g] for g in exact] == [[paths[i] for i in t] for t in truth[:3]]


def test_vectors_are_stored_once(tmp_path: Path) -> None:
    idx, vecs, _ = make(tmp_path, "ivf", 6000)
    files = idx.info()["disk"]["files"]
    assert files["vectors.f32"] == (6000 + 1) * DIM * 4  # slot 0 is unused: ids start at 1
    # 8-bit codes, not a second float32 copy
    assert files[idx.store.manifest["search"]["file"]] < 0.5 * files["vectors.f32"]
    con = sqlite3.connect(idx.store.path / "meta.sqlite")
    assert "vector" not in {r[1] for r in con.execute("PRAGMA table_info(images)")}


def test_auto_switches_from_flat_to_ivf_as_the_collection_grows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ann, "FLAT_MAX", 2000)
    idx = SimIndex(IndexStore.create(tmp_path / "auto", SIG))
    vecs = clustered(5000)
    idx.add_vectors([f"/a/{i}" for i in range(1500)], vecs[:1500])
    assert idx.store.manifest["search"]["kind"] == "flat"
    idx.add_vectors([f"/a/{i}" for i in range(1500, 5000)], vecs[1500:])
    s = idx.store.manifest["search"]
    assert s["kind"] == "ivf" and s["trained_on"] == 5000 and s["recall_at_10"] >= ann.TARGET_RECALL
    reopened = SimIndex.open(idx.store.path)
    assert reopened.search_vectors(vecs[4999], k=1)[0][0].path == "/a/4999"


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_removed_rows_never_come_back(tmp_path: Path, index_type: str) -> None:
    idx, vecs, paths = make(tmp_path, index_type, 3000)
    gone = paths[:500]
    idx.store.acquire_lock()
    with idx.store.transaction() as txn:
        txn.delete_paths(gone)
    idx.store.save()
    idx.store.release_lock()
    for reader in (idx, SimIndex.open(idx.store.path)):
        got = reader.search_vectors(vecs[:500], k=5)
        assert not {m.path for g in got for m in g} & set(gone)
        assert all(len(g) == 5 for g in got)


def test_readers_answer_from_committed_rows_while_a_writer_adds_and_removes(tmp_path: Path) -> None:
    idx, vecs, paths = make(tmp_path, "ivf", 3000)
    reader = SimIndex.open(idx.store.path)
    reader.search_vectors(vecs[:1], k=1)  # the reader has its structure mapped
    new = clustered(10, seed=77)
    writer = idx.store
    writer.acquire_lock()
    with writer.transaction() as txn:
        for i, v in enumerate(new):
            txn.insert(f"/new/{i}", 0, 0, f"n{i}", None, None, v)
        txn.delete_paths(paths[:3])
    # not saved yet: the structure on disk predates these rows; the reader still finds them, and not the removed
    got = reader.search_vectors(new, k=1)
    assert [g[0].path for g in got] == [f"/new/{i}" for i in range(10)]
    assert not {m.path for g in reader.search_vectors(vecs[:3], k=3) for m in g} & set(paths[:3])
    writer.save()
    writer.release_lock()


def test_add_vectors_replaces_a_repeated_path_and_normalises(tmp_path: Path) -> None:
    idx, vecs, paths = make(tmp_path, "flat", 100)
    v = vecs[7] * 3.0  # not unit length
    res = idx.add_vectors([paths[0]], v[None])
    assert res == {"added": 0, "replaced": 1, "total": 100}
    top = idx.search_vectors(vecs[7], k=2)[0]
    assert {m.path for m in top} == {paths[0], paths[7]} and top[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, DIM + 1)), "shape"),
        (np.full((2, DIM), np.nan), "NaN"),
        (np.zeros((2, DIM)), "all-zero"),
        (np.ones((3, DIM)), "3 vectors"),
    ],  # fmt: skip
)
def test_bad_vectors_are_refused_and_nothing_is_written(tmp_path: Path, bad: np.ndarray, message: str) -> None:
    idx, _, _ = make(tmp_path, "flat", 50)
    gen = idx.store.generation
    with pytest.raises(BadInputError, match=message):
        idx.add_vectors(["/x/1", "/x/2"], bad)
    assert idx.store.count() == 50 and idx.store.generation == gen


def test_cli_import_and_query_options(tmp_path: Path) -> None:
    vecs = clustered(3000)
    np.save(tmp_path / "v.npy", vecs)
    (tmp_path / "p.txt").write_text("\n".join(f"/remote/{i}.jpg" for i in range(3000)) + "\n")
    index = tmp_path / "imported"
    r = CliRunner().invoke(app, ["import", str(tmp_path / "v.npy"), str(tmp_path / "p.txt"), "--index", str(index),
                                 "--index-type", "ivf", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["added"] == 3000
    r = CliRunner().invoke(app, ["info", "--index", str(index), "--json"])
    info = json.loads(r.stdout)
    assert info["search"]["kind"] == "ivf" and info["disk"]["bytes_per_image"] < DIM * 4 + DIM + 400  # + SQLite row
    np.save(tmp_path / "bad.npy", vecs[:, :10])
    r = CliRunner().invoke(app, ["import", str(tmp_path / "bad.npy"), str(tmp_path / "p.txt"), "--index", str(index)])
    assert r.exit_code == 1 and "(n, 64)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["verify", "--index", str(index), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    img = tmp_path / "q.png"
    __import__("PIL.Image").Image.new("RGB", (32, 32)).save(img)
    r = CliRunner().invoke(app, ["query", str(img), "--index", str(index)])
    assert r.exit_code == 1 and "imported from elsewhere" in r.stderr  # no model to embed an image with


def test_format_1_indexes_are_upgraded_in_place(tmp_path: Path) -> None:
    """A format-1 index (vectors as SQLite blobs) opens as format 2 with the same rows and vectors."""
    path = tmp_path / "old"
    path.mkdir()
    vecs = clustered(20)
    con = sqlite3.connect(path / "meta.sqlite")
    con.executescript(
        "CREATE TABLE images (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,"
        " mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, width INTEGER, height INTEGER, added_at REAL NOT NULL,"
        " vector BLOB NOT NULL); CREATE INDEX images_sha256 ON images(sha256);"
        "CREATE TABLE failures (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, error TEXT NOT NULL,"
        " seen_at REAL NOT NULL); CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    )
    con.execute("INSERT INTO meta VALUES ('generation', '3')")
    con.execute("INSERT INTO meta VALUES ('signature', ?)", (json.dumps(SIG, sort_keys=True),))
    for i, v in enumerate(vecs):
        con.execute("INSERT INTO images (path, size, mtime_ns, sha256, width, height, added_at, vector) "
                    "VALUES (?,?,?,?,?,?,?,?)", (f"/old/{i}", 1, 2, f"s{i}", 4, 3, 0.0, v.tobytes()))  # fmt: skip
    con.commit()
    con.close()
    (path / "vectors.faiss").write_bytes(b"old snapshot")
    (path / "manifest.json").write_text(json.dumps({"format": "simsearch-index", "version": 1, **SIG,
                                                    "faiss_index": "IDMap2,Flat", "generation": 3}))  # fmt: skip
    idx = SimIndex.open(path)
    assert idx.store.manifest["version"] == 2 and not (path / "vectors.faiss").exists()
    assert idx.search_vectors(vecs[5], k=1)[0][0].path == "/old/5"
    assert np.array_equal(idx.store.vectors([6]), vecs[5:6])


def test_open_reads_no_vectors(tmp_path: Path) -> None:
    """Opening and answering one query touch a few pages, not the whole file (mmap, no hashing at open)."""
    idx, vecs, _ = make(tmp_path, "ivf", 8000)
    path = idx.store.path
    code = f"""
import resource, numpy as np
from simsearch.api import SimIndex
before = resource.getrusage(resource.RUSAGE_SELF).ru_inblock
idx = SimIndex.open({str(path)!r})
q = np.load({str(tmp_path / "q.npy")!r})
print(idx.search_vectors(q, k=3)[0][0].path)
"""
    np.save(tmp_path / "q.npy", vecs[42])
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "/nowhere/000042.jpg"


WRITER = """
import sys, numpy as np
from simsearch.api import SimIndex
from simsearch.index.store import IndexStore
from tests.test_ann import SIG, clustered
path, kind = sys.argv[1], sys.argv[2]
idx = SimIndex.open(path) if IndexStore.exists(path) else SimIndex(IndexStore.create(path, SIG, index_type=kind))
vecs = clustered(4000)
have = idx.store.count()
for a in range(have - have % 250, 4000, 250):
    idx.add_vectors([f"/k/{i}" for i in range(a, a + 250)], vecs[a : a + 250])
    print(a + 250, flush=True)
"""


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "ivfpq"])
def test_kill_9_while_adding_then_resume_with_every_type(tmp_path: Path, index_type: str, monkeypatch) -> None:
    """SIGKILL in the middle of commits: what is committed is intact and searchable; rerunning completes it."""
    import signal
    import subprocess
    import time

    path = tmp_path / "idx"
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    args = [sys.executable, "-c", WRITER, str(path), index_type]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    while True:
        line = p.stdout.readline()
        if not line or int(line) >= 2500:
            break
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    vecs = clustered(4000)
    store = IndexStore.open(path)
    n = store.count()
    assert 2500 <= n <= 4000 and n % 250 == 0  # whole commits only
    rows = store.all_rows()
    ids = np.array([r.id for r in rows])
    got = store.vectors(ids)
    assert np.allclose(got, vecs[[int(r.path.rsplit("/", 1)[1]) for r in rows]], atol=1e-6)
    scores, found = store.search(got[-5:], 1)
    assert found[:, 0].tolist() == ids[-5:].tolist()  # rows committed after the last save are found too
    store.close()
    with pytest.raises(Exception, match="being written"):
        holder = IndexStore.open(path)
        holder.acquire_lock()
        IndexStore.open(path).acquire_lock()
    holder.release_lock()
    subprocess.run(args, check=True, capture_output=True, env=env, cwd=root)
    idx = SimIndex.open(path)
    assert idx.store.count() == 4000
    expected = {"flat": "flat", "ivf": "ivf", "hnsw": "hnsw", "ivfpq": "ivfpq"}[index_type]
    assert idx.store.manifest["search"]["kind"] == expected
    top = idx.search_vectors(vecs[[0, 1999, 3999]], k=1)
    assert [g[0].path for g in top] == ["/k/0", "/k/1999", "/k/3999"]


def test_dedup_from_the_vector_file_equals_dedup_from_copies(tmp_path: Path, monkeypatch) -> None:
    """Large collections are grouped straight from the memory-mapped file; the groups are the same."""
    from simsearch.dedup import finder

    rng = np.random.default_rng(4)
    base = clustered(1500, seed=4, clusters=1500)
    near = base[:200] + rng.normal(scale=0.01, size=(200, DIM)).astype(np.float32)
    vecs = np.concatenate([base, near, base[300:310]])  # 200 near copies, 10 exact copies
    idx = SimIndex(IndexStore.create(tmp_path / "d", SIG, index_type="ivf"))
    idx.add_vectors([f"/d/{i}" for i in range(len(vecs))], vecs)
    idx.store.acquire_lock()
    with idx.store.transaction() as txn:
        txn.delete_paths([f"/d/{i}" for i in (1, 2, 3)])  # removed slots stay in the file, zeroed
    idx.store.save()
    idx.store.release_lock()
    monkeypatch.setattr(finder, "SLOT_ORDER_MIN", 10**9)
    copies = finder.find_duplicates(idx.store, 0.95)
    monkeypatch.setattr(finder, "SLOT_ORDER_MIN", 0)
    slots = finder.find_duplicates(idx.store, 0.95)
    assert [g.files for g in slots.groups] == [g.files for g in copies.groups]
    assert sum(g.kind == "exact" for g in slots.groups) == 10 and len(slots.groups) == 10 + 197


def test_a_query_near_small_lists_looks_wider_instead_of_scanning_everything(tmp_path: Path, monkeypatch) -> None:
    """With nprobe 1, a query whose nearest list holds fewer than k rows comes back short from FAISS: the store
    searches again with a wider nprobe (a few lists), not an exact scan of every vector."""
    idx, vecs, _ = make(tmp_path, "ivf", 6000)
    store = idx.store
    structure = store.faiss_index
    inner = ann._inner(structure)
    sizes = np.array([inner.invlists.list_size(i) for i in range(inner.nlist)])
    small = int(np.argmin(sizes))
    assert sizes[small] < 10
    q = inner.quantizer.reconstruct(small)[None].astype(np.float32)  # the small list's own centroid
    q /= np.linalg.norm(q)
    scans: list[tuple[int, int]] = []
    real_scan = store._scan
    monkeypatch.setattr(store, "_scan", lambda q_, lo, hi, k: scans.append((lo, hi)) or real_scan(q_, lo, hi, k))
    scores, ids = store.search(q, 10, param=1)
    assert (ids >= 0).all() and scans == []  # full answer, no scan
    truth = exact_top(vecs, q, 10)[0] + 1  # ids start at 1
    assert len(set(ids[0].tolist()) & set(truth.tolist())) >= 8
    np.testing.assert_allclose(scores[0], vecs[ids[0] - 1] @ q[0], rtol=1e-5, atol=1e-6)  # exact cosines


def test_query_vectors_of_any_finite_scale_are_normalised(tmp_path: Path) -> None:
    idx, vecs, paths = make(tmp_path, "flat", 100)
    for scale in (1.0, 1e-3, 7.5, 1e30):  # 1e30 overflows a float32 sum of squares: scaled down first
        top = idx.search_vectors(vecs[5] * scale, k=1)[0][0]
        assert top.path == paths[5] and top.score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(BadInputError, match="NaN or infinite"):
        idx.search_vectors(np.where(np.arange(DIM) == 3, np.inf, vecs[5]), k=1)


def test_rows_are_prefetched_only_the_first_time_they_are_read(tmp_path: Path, monkeypatch) -> None:
    idx, vecs, _ = make(tmp_path, "flat", 100)
    vf = idx.store.vectors_file
    asked: list[list[int]] = []
    monkeypatch.setattr(vf, "_prefetch", lambda m, rows: asked.append(sorted(rows.tolist())))
    first = vf.read(np.array([3, 9, 4], np.int64))
    again = vf.read(np.array([9, 4, 11, 12], np.int64))
    assert asked == [[3, 4, 9], [11, 12]]  # rows already read are in memory: not asked for again
    assert np.array_equal(again[:2], first[1:]) and np.allclose(again[2:], vecs[[10, 11]], atol=1e-6)
