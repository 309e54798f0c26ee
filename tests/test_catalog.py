"""Catalog lookup: visual words as a first stage beside the global ranking, the `stage` of matches, eval's catalog
mode, and the inverted file kept in sync (added, removed, merged)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch import SimIndex
from simsearch.cli import app
from simsearch.spatial.fusion import fuse
from simsearch.spatial.words import WordIndex, train_vocabulary
from tests.conftest import skimage_photo
from tests.test_spatial import clutter, warp_into

cv2 = pytest.importorskip("cv2")
COVERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "covers"


def test_fusion_keeps_both_lists_and_says_which_stage_found_each() -> None:
    out = fuse([1, 2, 3], [3, 4])
    assert [c.id for c in out] == [3, 1, 2, 4]  # 3 is in both lists; 2 and 4 tie (rank 1 each): by id
    assert {c.id: c.stage for c in out} == {1: "global", 2: "global", 3: "both", 4: "words"}
    assert [c.id for c in fuse([5, 6], [])] == [5, 6] and [c.id for c in fuse([], [7])] == [7]


def test_inverted_file_adds_removes_merges_and_never_reuses_a_removed_doc(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    desc = rng.random((4000, 128), np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    vocab = train_vocabulary(desc, k1=8, k2=8)
    assert vocab.size == 64 and vocab.trained_on == 4000
    words = {f"img{i}": np.sort(rng.choice(64, 12, replace=False)) for i in range(30)}
    wi = WordIndex.open(tmp_path, create=True)
    wi.set_vocabulary(vocab)
    for a in range(0, 30, 3):  # ten segments: more than MAX_SEGMENTS, so some are merged
        wi.add([(k, words[k]) for k in list(words)[a : a + 3]])
    assert len(wi) == 30 and wi.settings()["segments"] <= 8
    for k in ("img0", "img17", "img29"):
        hits = wi.search(words[k], 3)
        assert hits[0][0] == k and hits[0][1] > hits[1][1]
    before = wi.search(words["img29"], 1)[0][1]
    wi.remove(["img29"])
    assert all(sha != "img29" for sha, _ in wi.search(words["img29"], 30))
    wi.add([("new", words["img29"])])  # a new doc number: img29's old postings must not count for it
    hits = wi.search(words["img29"], 30)
    assert hits[0][0] == "new" and hits[0][1] <= before  # not doubled (dead postings only lower the idf)
    assert wi.compact(force=True) and wi.settings()["segments"] == 1
    assert wi.search(words["img29"], 1)[0][0] == "new" and wi.search(words["img5"], 1)[0][0] == "img5"
    other = WordIndex.open(tmp_path)  # another process sees the same state, the same vocabulary
    assert other.search_descriptors(desc[:50], 5) == wi.search_descriptors(desc[:50], 5)
    wi.close()
    other.close()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A catalog of clean posters among busy distractors, and phone-like photos of two posters: small, at an
    angle, in front of clutter (query stem = catalog stem)."""
    root = tmp_path_factory.mktemp("shop")
    cat, queries = root / "catalog", root / "queries"
    cat.mkdir()
    queries.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(skimage_photo(name)).save(cat / f"{name}.jpg", quality=92)
    for s in range(1, 9):
        Image.fromarray(clutter(s)).save(cat / f"clutter{s}.jpg", quality=90)
    corners = [[420, 170], [600, 200], [592, 400], [432, 380]]
    for name, bg in (("astronaut", 0), ("chelsea", 11)):  # backgrounds that are not in the catalog
        shot = warp_into(skimage_photo(name), clutter(bg), corners)
        Image.fromarray(shot).save(queries / f"{name}.jpg", quality=80)
    return cat, queries


def test_query_rerank_fuses_visual_words_and_labels_each_match(shop: tuple[Path, Path], tmp_path: Path) -> None:
    cat, queries = shop
    folder = tmp_path / "catalog"
    shutil.copytree(cat, folder)
    idx = tmp_path / "idx"
    r = CliRunner().invoke(app, ["index", str(folder), "--index", str(idx), "--local-features", "--json"])
    assert r.exit_code == 0, r.output
    words = json.loads(r.stdout)["local_features"]["words"]
    assert words["docs"] == 12 and words["added"] == 12 and words["trained"]
    assert 0 < words["bytes_per_image"] < 20_000
    with SimIndex.open(idx) as index:
        q = queries / "astronaut.jpg"
        found = index.word_matches(index.query_features(q), 3, index.vector_for(q))
        assert Path(found[0].path).name == "astronaut.jpg" and found[0].stage == "words"
        assert -1 <= found[0].score <= 1
    r = CliRunner().invoke(app, ["query", str(q), "--index", str(idx), "--rerank", "2", "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    matches = json.loads(r.stdout)["results"][0]["matches"]
    assert Path(matches[0]["path"]).name == "astronaut.jpg" and matches[0]["inliers"] >= 30
    assert matches[0]["stage"] in ("words", "both")
    assert all(m["stage"] in ("global", "words", "both") for m in matches)
    r = CliRunner().invoke(app, ["query", str(q), "--index", str(idx), "-k", "3", "--json"])
    assert all("stage" not in m for m in json.loads(r.stdout)["results"][0]["matches"])  # unchanged without rerank
    # kept in sync: a removed catalog image leaves the words, a new one joins them
    (folder / "astronaut.jpg").unlink()
    Image.fromarray(skimage_photo("camera")).save(folder / "camera.jpg", quality=90)
    r = CliRunner().invoke(app, ["index", str(folder), "--index", str(idx), "--json"])
    words = json.loads(r.stdout)["local_features"]["words"]
    assert (words["added"], words["dropped"], words["docs"], words["trained"]) == (1, 1, 12, False)
    with SimIndex.open(idx) as index:
        assert all(Path(m.path).name != "astronaut.jpg" for m in index.word_matches(index.query_features(q), 12))
        cam = folder / "camera.jpg"
        assert Path(index.word_matches(index.query_features(cam), 1)[0].path).name == "camera.jpg"
        assert index.info()["visual_words"]["docs"] == 12


def test_eval_catalog_mode_reports_each_stage(shop: tuple[Path, Path], tmp_path: Path) -> None:
    cat, queries = shop
    idx = tmp_path / "idx"
    args = ["eval", "--catalog", str(cat), "--queries", str(queries), "--index", str(idx), "--rerank", "3"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["queries"] == 2 and out["catalog_images"] == 12
    stages = out["stages"]
    assert set(stages) == {"global", "words", "fused", "reranked"}
    assert stages["words"]["r_at_10"] == 1.0 and stages["reranked"]["p_at_1"] == 1.0
    assert all(set(s) >= {"p_at_1", "r_at_10", "r_at_50"} for s in stages.values())
    assert out["ms_per_query"]["total"] > 0
    r = CliRunner().invoke(app, args)  # the kept index is reused; a text table
    assert r.exit_code == 0 and "reranked" in r.stdout and "R@50" in r.stdout
    mapping = tmp_path / "map.csv"
    mapping.write_text("query,catalog\nastronaut.jpg,coffee.jpg\nchelsea.jpg,chelsea.jpg\n")
    r = CliRunner().invoke(app, [*args, "--mapping", str(mapping), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stages"]["reranked"]["p_at_1"] == 0.5  # the astronaut photo is no coffee


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--catalog", "MISSING", "--queries", "Q"], "catalog folder not found"),
        (["--catalog", "C"], "needs both --catalog DIR and --queries DIR"),
        (["--catalog", "C", "--queries", "C"], "no catalog image"),
        ([], "give a FOLDER"),
    ],
)
def test_eval_catalog_bad_input_is_one_line(shop: tuple[Path, Path], tmp_path: Path, extra: list, message: str) -> None:
    cat, queries = shop
    (tmp_path / "other").mkdir()
    Image.fromarray(clutter(77)).save(tmp_path / "other" / "zzz.jpg")
    subst = {"C": str(cat), "Q": str(queries), "MISSING": str(tmp_path / "nope")}
    extra = [subst.get(a, a) for a in extra]
    if extra[-2:] == ["--queries", str(cat)]:
        extra[-1] = str(tmp_path / "other")
    r = CliRunner().invoke(app, ["eval", *extra, "--index", str(tmp_path / "idx")])
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.skipif(not (COVERS / "Reference").is_dir(), reason="../shared/data/covers not present")
def test_phone_photos_of_dvd_covers_find_their_scan_through_visual_words(tmp_path: Path) -> None:
    """Real phone photos (Stanford MVS covers): the visual words put the scan in the first 10 for nearly all."""
    cat, qdir = tmp_path / "cat", tmp_path / "q"
    cat.mkdir()
    qdir.mkdir()
    names = sorted(p.name for p in (COVERS / "Reference").glob("*.jpg"))[:16]
    for n in names:
        (cat / n).symlink_to(COVERS / "Reference" / n)
        (qdir / n).symlink_to(COVERS / "Canon" / n)
    extra = []
    clothing = COVERS.parent / "clothing" / "images"
    if clothing.is_dir():
        (tmp_path / "d").mkdir()
        for p in sorted(clothing.glob("*.jpg"))[:40]:
            (tmp_path / "d" / p.name).symlink_to(p)
        extra = ["--distractors", str(tmp_path / "d")]
    args = ["eval", "--catalog", str(cat), "--queries", str(qdir), "--rerank", "5", "--json", *extra]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    stages = json.loads(r.stdout)["stages"]
    assert stages["words"]["r_at_10"] >= 0.85 and stages["reranked"]["p_at_1"] >= 0.85


def test_server_search_with_rerank_uses_visual_words(shop: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from simsearch.serve.app import create_app

    cat, queries = shop
    idx = tmp_path / "idx"
    assert CliRunner().invoke(app, ["index", str(cat), "--index", str(idx), "--local-features"]).exit_code == 0
    client = TestClient(create_app(idx, warm_up=False), base_url="http://127.0.0.1")
    q = (queries / "chelsea.jpg").read_bytes()
    out = client.post("/api/search", params={"k": 2, "rerank": 2}, files={"image": ("q.jpg", q)}).json()
    first = out["matches"][0]
    assert Path(first["path"]).name == "chelsea.jpg" and first["stage"] == "words" and first["inliers"] >= 15
    plain = client.post("/api/search", params={"k": 2}, files={"image": ("q.jpg", q)}).json()
    assert Path(plain["matches"][0]["path"]).name != "chelsea.jpg" and "stage" not in plain["matches"][0]
    rid = first["id"]
    by_id = client.get("/api/search", params={"id": rid, "k": 1, "rerank": 3}).json()["matches"][0]
    assert by_id["id"] == rid and by_id["stage"] == "both"


def test_verify_checks_the_visual_words_and_repair_rebuilds_them(shop: tuple[Path, Path], tmp_path: Path) -> None:
    cat, _ = shop
    idx = tmp_path / "idx"
    assert CliRunner().invoke(app, ["index", str(cat), "--index", str(idx), "--local-features"]).exit_code == 0
    r = CliRunner().invoke(app, ["verify", "--index", str(idx), "--json"])
    assert r.exit_code == 0 and any(c["name"] == "visual words" and c["ok"] for c in json.loads(r.stdout)["checks"])
    seg = next((idx / "visual-words").glob("seg-*.postings.npy"))
    arr = np.load(seg)
    arr[:5] = 10**6  # postings naming documents that never existed
    np.save(seg, arr)
    r = CliRunner().invoke(app, ["verify", "--index", str(idx), "--json"])
    assert r.exit_code == 2
    assert [c["ok"] for c in json.loads(r.stdout)["checks"] if c["name"] == "visual words"] == [False]
    r = CliRunner().invoke(app, ["verify", "--index", str(idx), "--repair", "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["index", str(cat), "--index", str(idx), "--json"])
    words = json.loads(r.stdout)["local_features"]["words"]
    assert words["trained"] and words["docs"] == 12
    assert CliRunner().invoke(app, ["verify", "--index", str(idx)]).exit_code == 0
