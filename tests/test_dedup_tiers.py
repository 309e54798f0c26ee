"""Copies vs other shots (issue 26): every kind of copy stays a copy, bursts and multi-shot photos never are, EXIF
capture times decide when both files have them, and actions leave other shots alone unless asked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont
from typer.testing import CliRunner

from simsearch.cli import app
from tests.conftest import skimage_photo

cv2 = pytest.importorskip("cv2")
VIEWS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "views" / "triple"
COVERS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covers"
COPY_KINDS = ("q40", "half", "crop90", "bright", "text", "png", "webp")


def make_copies(src: Image.Image, stem: str, out: Path) -> list[Path]:
    """The copy edits the tiers must keep together: re-encode, resize, crop, brightness, caption, other formats."""
    w, h = src.size
    dx, dy = int(w * 0.05), int(h * 0.05)
    captioned = src.copy()
    ImageDraw.Draw(captioned).text((10, h - 30), "(c) 2026", fill=(255, 255, 255), font=ImageFont.load_default(18))
    edits = {
        "q40": (src, "jpg", {"quality": 40}),
        "half": (src.resize((w // 2, h // 2), Image.BICUBIC), "jpg", {"quality": 90}),
        "crop90": (src.crop((dx, dy, w - dx, h - dy)), "jpg", {"quality": 90}),
        "bright": (ImageEnhance.Brightness(src).enhance(1.3), "jpg", {"quality": 90}),
        "text": (captioned, "jpg", {"quality": 90}),
        "png": (src, "png", {}),
        "webp": (src, "webp", {"quality": 80}),
    }
    paths = []
    for kind, (im, ext, kw) in edits.items():
        p = out / f"{stem}.{kind}.{ext}"
        im.save(p, **kw)
        paths.append(p)
    return paths


def make_burst(src: np.ndarray, element: np.ndarray, stem: str, out: Path, seed: int, n: int = 3) -> list[Path]:
    """`n` shots of one scene: the viewpoint shifts a little (a perspective warp), a pasted element moves, the
    exposure changes slightly. A copy never has any of that."""
    rng = np.random.default_rng(seed)
    h, w = src.shape[:2]
    piece = cv2.resize(element, (w // 4, h // 4))
    ph, pw = piece.shape[:2]
    x0, y0 = int(w * 0.2), int(h * 0.3)
    paths = []
    for k in range(n):
        corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
        jitter = rng.uniform(-0.03, 0.03, (4, 2)) * [w, h] if k else np.zeros((4, 2))
        moved = (corners + jitter).astype(np.float32)
        frame = cv2.warpPerspective(src, cv2.getPerspectiveTransform(corners, moved), (w, h),
                                    borderMode=cv2.BORDER_REFLECT)  # fmt: skip
        x, y = x0 + int(0.09 * w * k), y0 + int(0.03 * h * k)
        frame[y : y + ph, x : x + pw] = piece
        frame = np.clip(frame.astype(np.float32) * (1 + 0.06 * k * (-1) ** k), 0, 255).astype(np.uint8)
        p = out / f"{stem}.shot{k}.jpg"
        Image.fromarray(frame).save(p, quality=90)
        paths.append(p)
    return paths


def with_exif(src: Path, dst: Path, when: str, camera: str = "Acme Phone") -> Path:
    """A byte-different copy of `src` carrying a capture time and camera in EXIF."""
    exif = Image.Exif()
    exif[271], exif[272] = camera.split()[0], camera.split()[-1]
    exif.get_ifd(0x8769)[36867] = when
    with Image.open(src) as im:
        im.convert("RGB").save(dst, quality=92, exif=exif)
    return dst


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two photos with every kind of copy, and two bursts of three shots; indexed with the default backbone."""
    root = tmp_path_factory.mktemp("tiers")
    folder = root / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        im = Image.fromarray(skimage_photo(name))
        im.save(folder / f"{name}.jpg", quality=92)
        make_copies(im, name, folder)
    make_burst(skimage_photo("astronaut"), skimage_photo("coffee"), "astronaut", folder, 1)
    make_burst(skimage_photo("rocket"), skimage_photo("chelsea"), "rocket", folder, 2)
    idx = root / "idx"
    r = CliRunner().invoke(app, ["index", str(folder), "--index", str(idx)])
    assert r.exit_code == 0, r.output
    return folder, idx


def dedup(idx: Path, *extra: str) -> dict:
    r = CliRunner().invoke(app, ["dedup", "--index", str(idx), "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def groups_of(out: dict, copies: bool) -> list[set[str]]:
    return [{Path(f).name for f in g["files"]} for g in out["groups"] if (g["kind"] != "similar") == copies]


def test_copies_of_each_kind_stay_copies(library: tuple[Path, Path]) -> None:
    _, idx = library
    copies = groups_of(dedup(idx), copies=True)
    for name in ("chelsea", "coffee"):
        want = {f"{name}.jpg"} | {f"{name}.{k}.{'jpg' if k not in ('png', 'webp') else k}" for k in COPY_KINDS}
        assert want in copies, copies


def test_bursts_are_other_shots_never_copies(library: tuple[Path, Path]) -> None:
    _, idx = library
    out = dedup(idx)
    for g in groups_of(out, copies=True):
        assert sum(".shot" in f for f in g) <= 1, g
    similar = groups_of(out, copies=False)
    for stem in ("astronaut", "rocket"):
        assert {f"{stem}.shot{k}.jpg" for k in range(3)} in similar, similar
    g = next(g for g in out["groups"] if g["kind"] == "similar")
    assert len(g["shots"]) == len(g["files"]) and all("sharpness" in s for s in g["shots"])
    assert out["similar_files"] == 4 and out["tiers"]["similar"] >= 4
    hidden = dedup(idx, "--no-similar")
    assert not groups_of(hidden, copies=False) and groups_of(hidden, copies=True) == groups_of(out, copies=True)


def test_python_api_similar_switch(library: tuple[Path, Path]) -> None:
    from simsearch.dedup.finder import find_duplicates
    from simsearch.index.store import IndexStore

    _, idx = library
    with IndexStore.open(idx) as store:
        both = find_duplicates(store)
        copies = find_duplicates(store, similar=False)
    assert any(g.kind == "similar" for g in both.groups)
    assert all(g.kind in ("exact", "near") for g in copies.groups)
    assert both.duplicates == copies.duplicates == 14


def test_explain_names_the_tier(library: tuple[Path, Path]) -> None:
    folder, idx = library
    for a, b, tier in (("chelsea.jpg", "chelsea.crop90.jpg", "copy"), ("rocket.shot0.jpg", "rocket.shot1.jpg",
                                                                         "similar")):  # fmt: skip
        r = CliRunner().invoke(app, ["dedup", "--index", str(idx), "--explain", str(folder / a), str(folder / b)])
        assert r.exit_code == 0, r.output
        assert ("tier: copies" if tier == "copy" else "tier: other shots") in r.output, r.output
        r = CliRunner().invoke(app, ["dedup", "--index", str(idx), "--json", "--explain", str(folder / a),
                                     str(folder / b)])  # fmt: skip
        assert json.loads(r.stdout)["tier"] == tier


def test_exif_capture_time_decides_when_both_files_have_it(tmp_path: Path) -> None:
    from simsearch.dedup.tiers import compare, load_thumb

    src = tmp_path / "src.jpg"
    Image.fromarray(skimage_photo("chelsea")).save(src, quality=95)
    a = with_exif(src, tmp_path / "a.jpg", "2026:05:01 10:00:00")
    same = with_exif(src, tmp_path / "same.jpg", "2026:05:01 10:00:00")
    later = with_exif(src, tmp_path / "later.jpg", "2026:05:01 10:00:02")
    other_phone = with_exif(src, tmp_path / "phone.jpg", "2026:05:01 10:00:00", "Other Cam")
    stripped = tmp_path / "stripped.jpg"
    Image.open(src).save(stripped, quality=80)
    ta = load_thumb(str(a))
    assert ta.captured == "2026:05:01 10:00:00" and ta.camera == "Acme Phone"
    assert compare(ta, load_thumb(str(same))).tier == "copy"
    assert compare(ta, load_thumb(str(stripped))).tier == "copy"  # a copy may strip EXIF
    for other in (later, other_phone):
        ev = compare(ta, load_thumb(str(other)))
        assert ev.tier == "similar" and "EXIF" in ev.why


def test_default_action_never_moves_another_shot(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    im = Image.fromarray(skimage_photo("coffee"))
    im.save(folder / "coffee.jpg", quality=92)
    im.save(folder / "coffee.copy.jpg", quality=40)
    make_burst(skimage_photo("astronaut"), skimage_photo("chelsea"), "astronaut", folder, 3)
    idx = tmp_path / "idx"
    assert CliRunner().invoke(app, ["index", str(folder), "--index", str(idx)]).exit_code == 0
    moved = tmp_path / "moved"
    out = dedup(idx, "--action", "move", "--to", str(moved), "--yes")
    gone = {Path(m["from"]).name for m in out["action"]["moves"]}
    assert gone == {"coffee.copy.jpg"}, gone
    assert all((folder / f"astronaut.shot{k}.jpg").exists() for k in range(3))
    out = dedup(idx, "--action", "move", "--to", str(moved), "--yes", "--include-similar")
    gone = {Path(m["from"]).name for m in out["action"]["moves"]}
    assert len(gone) == 2 and all(".shot" in g for g in gone), gone
    best = next(g for g in out["groups"] if g["kind"] == "similar")["files"][0]
    assert Path(best).exists()


def test_shared_multi_shot_photos_are_never_copies(tmp_path: Path) -> None:
    """Three shots of each scene (views/triple) and five photos of each cover (a scan, four phones)."""
    if not VIEWS.is_dir() or not COVERS.is_dir():
        pytest.skip("../shared/data/views or covers is not available")
    folder = tmp_path / "shots"
    folder.mkdir()
    for p in sorted(VIEWS.glob("*.jpg")):
        if not p.name.startswith("pebbles"):  # known limit (README): a flat plane after a sideways step = a crop
            shutil.copy2(p, folder / p.name)
    for d in ("Reference", "Canon", "Droid", "E63", "Palm"):
        for c in ("001", "002", "003", "004"):
            if (COVERS / d / f"{c}.jpg").exists():
                shutil.copy2(COVERS / d / f"{c}.jpg", folder / f"cover{c}-{d}.jpg")
    idx = tmp_path / "idx"
    assert CliRunner().invoke(app, ["index", str(folder), "--index", str(idx)]).exit_code == 0
    out = dedup(idx, "--verify")
    assert out["duplicates"] == 0, groups_of(out, copies=True)
    assert groups_of(out, copies=False)  # related shots are reported, as other shots


def test_server_resolve_needs_include_similar_for_other_shots(tmp_path: Path) -> None:
    """POST /api/duplicates/resolve refuses a similar group's file unless include_similar is true; the HTML
    report marks the best shot."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from simsearch.dedup.finder import find_duplicates
    from simsearch.dedup.report import write_html
    from simsearch.index.store import IndexStore
    from simsearch.serve.app import create_app

    folder = tmp_path / "photos"
    folder.mkdir()
    shots = make_burst(skimage_photo("astronaut"), skimage_photo("chelsea"), "astronaut", folder, 4)
    idx = tmp_path / "idx"
    assert CliRunner().invoke(app, ["index", str(folder), "--index", str(idx)]).exit_code == 0
    with IndexStore.open(idx) as store:
        page = write_html(find_duplicates(store), store, tmp_path / "report.html").read_text()
    assert "BEST SHOT" in page and "other shot" in page and "similar" in page
    c = TestClient(create_app(idx, warm_up=False), base_url="http://127.0.0.1")
    rep = c.get("/api/duplicates", params={"threshold": 0.85}).json()
    g = next(g for g in rep["groups"] if g["kind"] == "similar")
    assert len(g["shots"]) == 3 and rep["similar_files"] == 2 and rep["duplicates"] == 0
    copies_only = c.get("/api/duplicates", params={"threshold": 0.85, "similar": "false"}).json()["groups"]
    assert not any(x["kind"] == "similar" for x in copies_only)
    body = {"ids": g["ids"], "remove": g["ids"][1:2], "threshold": 0.85}
    r = c.post("/api/duplicates/resolve", json=body)
    assert r.status_code == 400 and "include_similar" in r.json()["error"]
    assert all(p.exists() for p in shots)
    r = c.post("/api/duplicates/resolve", json={**body, "include_similar": True})
    assert r.status_code == 200, r.text
    assert sum(p.exists() for p in shots) == 2


def test_worker_processes_give_the_in_process_tiers(library: tuple[Path, Path]) -> None:
    """Many pairs go to one child Python per core (whole components); the verdicts are the same as in-process."""
    import simsearch.dedup.verify as verify
    from simsearch.dedup.finder import auto_threshold
    from simsearch.dedup.graph import similar_pairs
    from simsearch.index.store import IndexStore

    _, idx = library
    with IndexStore.open(idx) as store:
        rows = store.all_rows()
        i, j, s = similar_pairs(store.vectors([r.id for r in rows]), auto_threshold(store))
        here = verify.tier_pairs(store.path, rows, i, j, s, threads=1)
        split = verify._tier_pairs_split((store.path, rows, i, j, s, True, True, None, False), 2, None)
    assert len(i) > 10
    assert np.array_equal(here.tier, split.tier) and np.array_equal(here.implied, split.implied)
    assert set(here.thumbs) == set(split.thumbs)
