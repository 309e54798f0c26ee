"""Spatial re-ranking and geometric dedup: local features, RANSAC, stored features kept in sync."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch import SimIndex
from simsearch.cli import app
from tests.conftest import skimage_photo

cv2 = pytest.importorskip("cv2")


def clutter(seed: int, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """Random coloured rectangles on grey: busy, but sharing no structure across seeds."""
    rng = np.random.default_rng(seed)
    img = np.full((size[1], size[0], 3), 128, np.uint8)
    for _ in range(90):
        x, y = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        w, h = int(rng.integers(10, 80)), int(rng.integers(10, 80))
        cv2.rectangle(img, (x, y), (x + w, y + h), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    return img


def warp_into(poster: np.ndarray, background: np.ndarray, corners: list[list[int]]) -> np.ndarray:
    """`poster` seen under a homography (its corners land on `corners`) in front of `background`."""
    h, w = poster.shape[:2]
    src = np.float32([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
    hom = cv2.getPerspectiveTransform(src, np.float32(corners))
    size = (background.shape[1], background.shape[0])
    warped = cv2.warpPerspective(poster, hom, size)
    mask = cv2.warpPerspective(np.full((h, w), 255, np.uint8), hom, size)
    return np.where(mask[..., None] > 0, warped, background)


def indexed(folder: Path, idx: Path) -> Path:
    assert CliRunner().invoke(app, ["index", str(folder), "--index", str(idx)]).exit_code == 0
    return idx


def dedup_groups(idx: Path, *extra: str) -> tuple[list[set[str]], dict]:
    """`simsearch dedup --json` groups as sets of file names (sorted), and the whole report."""
    r = CliRunner().invoke(app, ["dedup", "--index", str(idx), "--json", *extra])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    return sorted(({Path(f).name for f in g["files"]} for g in out["groups"]), key=sorted), out


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder with a planar poster and busy look-alike distractors, and a query: the poster photographed at an
    angle, small, in front of clutter."""
    root = tmp_path_factory.mktemp("scene")
    db = root / "db"
    db.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "camera"):
        Image.fromarray(skimage_photo(name)).save(db / f"{name}.jpg", quality=92)
    for s in range(1, 6):
        Image.fromarray(clutter(s)).save(db / f"clutter{s}.jpg", quality=90)
    query = root / "query.jpg"
    shot = warp_into(skimage_photo("astronaut"), clutter(0), [[420, 170], [600, 200], [592, 400], [432, 380]])
    Image.fromarray(shot).save(query, quality=80)
    return db, query


def test_rerank_finds_the_poster_the_global_descriptor_misses(scene: tuple[Path, Path], tmp_path: Path) -> None:
    db, query = scene
    with SimIndex.create(tmp_path / "idx") as idx:
        idx.add_folder(db)
        plain = idx.search(query, k=5)
        assert Path(plain[0].path).name != "astronaut.jpg"  # the premise: globally, clutter looks closer
        assert all(m.inliers is None for m in plain)
        reranked = idx.search(query, k=5, rerank=9)
        cosines = {m.id: m.score for m in idx.search(query, k=9)}
    assert Path(reranked[0].path).name == "astronaut.jpg"
    assert reranked[0].inliers >= 30
    assert all(m.inliers < 15 for m in reranked[1:])
    assert all(m.score == cosines[m.id] for m in reranked)  # scores stay the global cosines


def test_query_rerank_cli_json_and_stored_features_in_sync(scene: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    db, query = scene
    folder = tmp_path / "photos"
    shutil.copytree(db, folder)
    idx = tmp_path / "idx"
    r = CliRunner().invoke(app, ["index", str(folder), "--index", str(idx), "--local-features", "--json"])
    assert r.exit_code == 0, r.output
    lf = json.loads(r.stdout)["local_features"]
    assert lf["extracted"] == 9 and lf["stored"] == 9 and lf["failed"] == 0
    assert 10_000 < lf["bytes_per_image"] < 80_000
    r = CliRunner().invoke(app, ["query", str(query), "--index", str(idx), "--rerank", "9", "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    matches = json.loads(r.stdout)["results"][0]["matches"]
    assert Path(matches[0]["path"]).name == "astronaut.jpg" and matches[0]["inliers"] >= 30
    assert all("inliers" in m for m in matches)
    r = CliRunner().invoke(app, ["query", str(query), "--index", str(idx), "-k", "3", "--json"])
    assert all("inliers" not in m for m in json.loads(r.stdout)["results"][0]["matches"])  # unchanged without it
    # kept in sync like vectors: a removed file's features go, a new file's come, a move costs nothing
    (folder / "camera.jpg").unlink()
    (folder / "chelsea.jpg").rename(folder / "cat.jpg")
    Image.fromarray(clutter(42)).save(folder / "new.jpg", quality=90)
    r = CliRunner().invoke(app, ["index", str(folder), "--index", str(idx), "--json"])
    assert r.exit_code == 0, r.output
    lf = json.loads(r.stdout)["local_features"]
    assert (lf["extracted"], lf["pruned"], lf["stored"]) == (1, 1, 9)


def test_rerank_without_stored_features_and_of_an_indexed_query(scene: tuple[Path, Path], tmp_path: Path) -> None:
    db, query = scene
    with SimIndex.create(tmp_path / "idx") as idx:
        idx.add_folder(db)
        assert not (tmp_path / "idx" / "local-features.sqlite").exists()
        hits = idx.search(str(db / "astronaut.jpg"), k=3, rerank=5)  # features extracted on demand
        assert Path(hits[0].path).name == "astronaut.jpg" and hits[0].inliers >= 100
        by_id = idx.search(hits[0].id, k=1, rerank=5)
        assert by_id[0].id == hits[0].id and by_id[0].inliers == hits[0].inliers
        with pytest.raises(Exception, match="rerank"):
            idx.search(query, rerank=-1)


def test_dedup_verify_keeps_a_crop_and_never_calls_another_photo_of_the_same_background_a_copy(tmp_path: Path) -> None:
    """Two photos of different objects on one background match geometrically on the background; only the crop of
    the first is a copy. The other photo is at most another shot of the scene (issue 26: "similar", never a copy)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    background = cv2.resize(skimage_photo("rocket"), (640, 480))
    corners = [[170, 110], [470, 110], [470, 370], [170, 370]]
    first = warp_into(cv2.resize(skimage_photo("astronaut"), (300, 260)), background, corners)
    second = warp_into(cv2.resize(skimage_photo("chelsea"), (300, 260)), background, corners)
    Image.fromarray(first).save(folder / "first.jpg", quality=90)
    Image.fromarray(second).save(folder / "second.jpg", quality=90)
    Image.fromarray(first[40:440, 50:600]).save(folder / "first-crop.jpg", quality=85)
    Image.fromarray(skimage_photo("coffee")).save(folder / "coffee.jpg", quality=90)
    idx = indexed(folder, tmp_path / "idx")
    loose, _ = dedup_groups(idx, "--threshold", "0.3")
    assert {"first.jpg", "second.jpg", "first-crop.jpg"} <= set().union(*loose)  # cosine alone groups them all
    _, out = dedup_groups(idx, "--threshold", "0.3", "--verify")
    copies = [{Path(f).name for f in g["files"]} for g in out["groups"] if g["kind"] != "similar"]
    assert copies == [{"first.jpg", "first-crop.jpg"}]
    others = [{Path(f).name for f in g["files"]} for g in out["groups"] if g["kind"] == "similar"]
    assert others in ([], [{"first.jpg", "second.jpg"}])  # the crop's group is represented by its kept file
    assert "coffee.jpg" not in set().union(*copies, *others)
    assert out["verified"]["dropped"] >= 1


def test_verify_finds_and_repairs_a_damaged_features_record(photos: Path, tmp_path: Path) -> None:
    import sqlite3

    idx = tmp_path / "idx"
    r = CliRunner().invoke(app, ["index", str(photos), "--index", str(idx), "--local-features", "--json"])
    assert r.exit_code == 0, r.output
    with sqlite3.connect(idx / "local-features.sqlite") as conn:
        conn.execute("UPDATE features SET data = substr(data, 1, 100) WHERE rowid = 1")
    r = CliRunner().invoke(app, ["verify", "--index", str(idx), "--json"])
    assert r.exit_code != 0
    check = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "local features")
    assert not check["ok"] and "1 damaged" in check["detail"]
    r = CliRunner().invoke(app, ["verify", "--index", str(idx), "--repair", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["repaired"], r.output
    r = CliRunner().invoke(app, ["index", str(photos), "--index", str(idx), "--json"])
    assert json.loads(r.stdout)["local_features"]["extracted"] == 1
    info = json.loads(CliRunner().invoke(app, ["info", "--index", str(idx), "--json"]).stdout)
    assert 10_000 < info["local_features"]["bytes_per_image"] < 100_000


def test_default_dedup_confirms_copies_below_the_cosine_threshold(tmp_path: Path) -> None:
    """The default verifies the band under 0.90 geometrically: a 68% crop (cosine about 0.89) joins its original,
    which cosine alone at 0.90 (--no-verify) misses."""
    from PIL import ImageEnhance

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee", "camera"):
        im = Image.fromarray(skimage_photo(name))
        im.save(folder / f"{name}.jpg", quality=90)
        w, h = im.size
        f = 0.16 if name == "chelsea" else 0.12
        im.crop((int(w * f), int(h * f), int(w * (1 - f)), int(h * (1 - f)))).save(folder / f"{name}-crop.jpg")
        ImageEnhance.Brightness(im).enhance(1.4).save(folder / f"{name}-bright.jpg", quality=85)
    idx = indexed(folder, tmp_path / "idx")
    found, out = dedup_groups(idx)
    assert found == [{f"{n}.jpg", f"{n}-crop.jpg", f"{n}-bright.jpg"} for n in ("camera", "chelsea", "coffee")]
    assert out["threshold"] < 0.9 and out["verified"]["checked"] >= 1 and out["verified"]["dropped"] == 0
    cosine_only, out = dedup_groups(idx, "--no-verify")
    assert "verified" not in out and out["threshold"] == 0.9
    assert {"chelsea.jpg", "chelsea-bright.jpg"} in cosine_only and "chelsea-crop.jpg" not in set().union(*cosine_only)
