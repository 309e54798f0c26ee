"""Crash safety: SIGKILL at several points, resume, Ctrl-C, locks, corrupt files, version checks."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.errors import IndexCorruptError, IndexLockedError, IndexMismatchError
from simsearch.index.store import IndexStore

MODEL = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--input-size", "96", "--engine", "keras"]
N_IMAGES = 240


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "simsearch.cli", *map(str, args)]


def noise_images(d: Path, n: int, seed: int, suffix: str = ".png") -> Path:
    """n distinct smooth random pictures img-000... in `d` (the same for a seed)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((160, 120), Image.BILINEAR).save(d / f"img-{i:03d}{suffix}", quality=90)
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return noise_images(tmp_path_factory.mktemp("many"), N_IMAGES, 3)


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    index = tmp_path_factory.mktemp("ref") / "idx"
    r = subprocess.run(cli("index", folder, "--index", index, *MODEL, "--json"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return vectors_by_path(index)


def vectors_by_path(index: Path) -> dict[str, np.ndarray]:
    with IndexStore.open(index) as store:
        rows = {r.id: r.path for r in store.all_rows()}
        return {rows[int(i)]: v for ids, vecs in store.iter_vectors() for i, v in zip(ids, vecs, strict=True)}


def committed(index: Path) -> int:
    db = index / "meta.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            return c.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    except sqlite3.Error:
        return 0


def check_consistent(index: Path, reference: dict[str, np.ndarray]) -> int:
    """The index opens, holds only complete entries without duplicates, and its vectors equal a clean build."""
    with IndexStore.open(index) as store:
        rows = store.all_rows()
        assert len({r.path for r in rows}) == len(rows) == len({r.id for r in rows})
        assert store.vectors_file.slots > max((r.id for r in rows), default=-1)  # every committed row has its vector
        structure = store.faiss_index
        assert structure is None or structure.ntotal <= len(rows)  # it never holds rows that are not committed
        got = vectors_by_path(index)
        for path, v in got.items():
            np.testing.assert_allclose(v, reference[path], atol=2e-5)
        if rows:
            scores, ids = store.search(store.vectors([rows[0].id]), 1)
            assert ids[0, 0] == rows[0].id and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        return len(rows)


def test_sigkill_at_several_points_then_resume(folder: Path, reference: dict, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    args = cli("index", folder, "--index", index, *MODEL, "--commit-every", "16", "--batch-size", "8", "--json")
    seen = []
    # Kill before anything is committed, after the first chunk, and in the middle; each run resumes the last.
    for kill_at in (0, 16, 112):
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while committed(index) < kill_at + (1 if kill_at else 0) and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if kill_at == 0:
            time.sleep(1.0)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if (index / "manifest.json").exists():
            n = check_consistent(index, reference)
            seen.append(n)
    assert seen and seen[-1] >= 112 and seen[-1] < N_IMAGES
    before = seen[-1]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["unchanged"] == before and out["embedded"] == N_IMAGES - before
    assert check_consistent(index, reference) == N_IMAGES


def test_ctrl_c_commits_and_says_how_to_resume(folder: Path, reference: dict, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    args = cli("index", folder, "--index", index, *MODEL, "--commit-every", "16", "--batch-size", "8")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while committed(index) < 32 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Run the same command again to resume" in err and "Traceback" not in err
    with IndexStore.open(index) as store:
        assert store.manifest["generation"] == store.generation  # the FAISS snapshot was saved on the way out
    assert check_consistent(index, reference) >= 32


def test_second_writer_is_told_who_holds_the_lock(folder: Path, reference: dict, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    subprocess.run(cli("index", folder, "--index", index, *MODEL), check=True, capture_output=True)
    with IndexStore.open(index) as holder:
        holder.acquire_lock()
        r = subprocess.run(cli("index", folder, "--index", index), capture_output=True, text=True)
        assert r.returncode == 1 and f"process {os.getpid()}" in r.stderr
        with pytest.raises(IndexLockedError):
            IndexStore.open(index).acquire_lock()
        # readers still answer while the writer holds the lock
        r = subprocess.run(cli("query", folder / "img-005.png", "--index", index, "-k", "1", "--json"),
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0 and json.loads(r.stdout)["results"][0]["matches"][0]["score"] == 1.0


FAST = ["--weights", "none", "--input-size", "64"]  # TFLite, converted once per session


def found_first(index: Path) -> bool:
    """Every stored vector finds its own row first."""
    with IndexStore.open(index) as store:
        ids = np.array([r.id for r in store.all_rows()])
        _, top = store.search(store.vectors(ids), 1)
        return len(ids) == N_IMAGES and top[:, 0].tolist() == ids.tolist()


@pytest.mark.parametrize("index_type", ["flat", "IVF8,SQ8"])
def test_damaged_files_are_reported_and_recovered(folder: Path, tmp_path: Path, index_type: str) -> None:
    index = tmp_path / "idx"
    subprocess.run(cli("index", folder, "--index", index, *FAST, "--index-type", index_type), check=True,
                   capture_output=True)  # fmt: skip
    if index_type != "flat":
        search = index / json.loads((index / "manifest.json").read_text())["search"]["file"]
        data = search.read_bytes()
        search.write_bytes(data[: len(data) // 2])  # truncated: caught at open, by size
        r = subprocess.run(cli("query", folder / "img-001.png", "--index", index), capture_output=True, text=True)
        assert r.returncode == 2 and "damaged" in r.stderr and "Traceback" not in r.stderr
        r = subprocess.run(cli("verify", "--index", index, "--repair", "--json"), capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["repaired"] is True
        assert found_first(index)
    # a flipped byte inside one stored vector: open stays O(1), verify finds it from the row checksums
    vec = index / "vectors.f32"
    data = bytearray(vec.read_bytes())
    data[len(data) // 2] ^= 0xFF
    vec.write_bytes(bytes(data))
    r = subprocess.run(cli("verify", "--index", index, "--json"), capture_output=True, text=True)
    assert r.returncode == 2
    bad = [c for c in json.loads(r.stdout)["checks"] if not c["ok"]]
    assert [c["name"] for c in bad] == ["vectors"] and "1 with a damaged vector" in bad[0]["detail"]
    vec.write_bytes(bytes(data[: len(data) // 3]))  # truncated vectors: caught at open
    with pytest.raises(IndexCorruptError, match="truncated"):
        IndexStore.open(index)
    r = subprocess.run(cli("query", folder / "img-001.png", "--index", index), capture_output=True, text=True)
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr
    (index / "undo").mkdir()
    (index / "undo" / "keep.json").write_text("{}")  # an undo manifest survives the rebuild
    r = subprocess.run(cli("index", folder, "--index", index, *FAST, "--rebuild", "--json"), capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0 and "rebuilding it from scratch" in r.stderr, r.stderr
    assert json.loads(r.stdout)["indexed"] == N_IMAGES and (index / "undo" / "keep.json").is_file()
    assert found_first(index)


def test_wrong_version_and_backbone_are_refused(folder: Path, reference: dict, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    subprocess.run(cli("index", folder, "--index", index, *MODEL), check=True, capture_output=True)
    r = subprocess.run(cli("index", folder, "--index", index, "--backbone", "efficientnet-lite0"),
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "--rebuild" in r.stderr
    m = json.loads((index / "manifest.json").read_text())
    m["version"] = 99
    (index / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexMismatchError, match="format version 99"):
        IndexStore.open(index)
