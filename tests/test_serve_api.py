"""The HTTP API of `simsearch serve` with FastAPI's TestClient: every endpoint, every error, the security checks."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app as cli_app
from simsearch.index.store import IndexStore

from .conftest import edited
from .serve_util import build_index, build_library

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from simsearch.serve.app import create_app, is_loopback  # noqa: E402

BASE = "http://127.0.0.1"
MATCH_KEYS = {"id", "path", "score", "width", "height"}


@pytest.fixture(scope="module")
def lib(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("serve-lib")
    folder = build_library(photos, d / "lib")
    return folder, build_index(folder, d / "idx")


@pytest.fixture(scope="module")
def client(lib: tuple[Path, Path]) -> TestClient:
    return TestClient(create_app(lib[1], warm_up=False), base_url=BASE)


@pytest.fixture
def fresh(photos: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A library and index of its own, for tests that change files."""
    folder = build_library(photos, tmp_path / "lib")
    return folder, build_index(folder, tmp_path / "idx")


def ids_by_name(client: TestClient) -> dict[str, int]:
    rep = client.get("/api/duplicates", params={"threshold": -1, "group": "star", "limit": 1000}).json()
    return {Path(m["path"]).name + ("@copies" if "/copies/" in m["path"] else ""): m["id"]
            for g in rep["groups"] for m in g["members"]}  # fmt: skip


def row_id(index: Path, path: Path) -> int:
    with IndexStore.open(index) as s:
        row = s.row_by_path(str(path))
        assert row is not None
        return row.id


def jpeg(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def assert_error(r, status: int, text: str = "") -> None:  # noqa: ANN001
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    assert text.lower() in body["error"].lower()


# ---- info, search --------------------------------------------------------------------------------------------
def test_info(client: TestClient, lib: tuple[Path, Path]) -> None:
    r = client.get("/api/info")
    assert r.status_code == 200
    info = r.json()
    assert info["counts"] == {"images": 11, "failed": 0}
    assert info["path"] == str(lib[1])
    assert info["backbone"] == "efficientnet-lite0"
    assert info["server"]["read_only"] is False and info["server"]["move"] is False
    assert info["server"]["generation"] == info["generation_committed"]


def test_search_by_id_finds_itself_first(client: TestClient, lib: tuple[Path, Path]) -> None:
    folder, index = lib
    rid = row_id(index, folder / "astronaut.jpg")
    r = client.get("/api/search", params={"id": rid, "k": 3})
    assert r.status_code == 200
    out = r.json()
    assert out["query"] == str(folder / "astronaut.jpg") and out["query_id"] == rid
    assert len(out["matches"]) == 3 and all(set(m) == MATCH_KEYS for m in out["matches"])
    first = out["matches"][0]
    assert first == {"id": rid, "path": str(folder / "astronaut.jpg"), "score": 1.0,
                     "width": 512, "height": 512}  # fmt: skip
    assert out["matches"][1]["score"] < 0.9


def test_search_by_id_min_score_filters(client: TestClient, lib: tuple[Path, Path]) -> None:
    folder, index = lib
    out = client.get("/api/search", params={"id": row_id(index, folder / "coffee.jpg"), "min_score": 0.8}).json()
    assert [m["path"] for m in out["matches"]] == [str(folder / "coffee.jpg"), str(folder / "copies/coffee-small.jpg")]


def test_search_upload_ranks_the_original_first(client: TestClient, photos: Path, tmp_path: Path) -> None:
    q = edited(photos / "rocket.jpg", tmp_path / "q.jpg", scale=0.5, quality=40)
    with Image.open(q) as im:
        size = im.size
    r = client.post("/api/search?k=4", files={"image": ("q.jpg", q.read_bytes(), "image/jpeg")})
    assert r.status_code == 200
    out = r.json()
    assert out["query"] == "q.jpg" and out["query_id"] is None and (out["width"], out["height"]) == size
    m = out["matches"]
    assert len(m) == 4 and all(set(x) == MATCH_KEYS for x in m)
    assert m[0]["path"].endswith("/rocket.jpg") and m[0]["score"] > m[1]["score"] + 0.2


def test_search_upload_of_an_indexed_file_scores_one(client: TestClient, lib: tuple[Path, Path]) -> None:
    folder, _ = lib
    data = (folder / "coffee.jpg").read_bytes()
    out = client.post("/api/search", params={"k": 1}, files={"image": ("c.jpg", data)}).json()
    assert out["matches"][0]["path"] == str(folder / "coffee.jpg")
    assert out["matches"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_search_rerank_reports_inliers(client: TestClient, lib: tuple[Path, Path], photos: Path,
                                      tmp_path: Path) -> None:  # fmt: skip
    pytest.importorskip("cv2")
    folder, index = lib
    rid = row_id(index, folder / "astronaut.jpg")
    out = client.get("/api/search", params={"id": rid, "k": 3, "rerank": 6}).json()
    assert all(set(m) == MATCH_KEYS | {"inliers"} for m in out["matches"])
    assert out["matches"][0]["id"] == rid and out["matches"][0]["inliers"] >= 100
    q = edited(photos / "rocket.jpg", tmp_path / "q.jpg", scale=0.5, quality=40)
    r = client.post("/api/search", params={"k": 2, "rerank": 6}, files={"image": ("q.jpg", q.read_bytes())})
    assert r.status_code == 200, r.text
    m = r.json()["matches"]
    assert m[0]["path"].endswith("/rocket.jpg") and m[0]["inliers"] >= 30 and m[1]["inliers"] < m[0]["inliers"]


@pytest.mark.parametrize(
    "params, text",
    [({"id": 1, "k": 0}, "k"), ({"id": 1, "k": "x"}, "k"), ({"id": 1, "min_score": 2}, "min_score"),
     ({"id": "abc"}, "id"), ({"id": "1.5"}, "id"), ({}, "id"), ({"id": 1, "rerank": -1}, "rerank"),
     ({"id": 1, "rerank": 1000}, "rerank")],
)  # fmt: skip
def test_search_bad_parameters_are_400(client: TestClient, params: dict, text: str) -> None:
    assert_error(client.get("/api/search", params=params), 400, text)


@pytest.mark.parametrize("rid", [99999, -3, 2**63, -(2**63) - 1, 10**30])
def test_search_unknown_id_is_404(client: TestClient, rid: int) -> None:
    """Any integer that is no id of the index, even outside SQLite's range (it was 500), is 404."""
    assert_error(client.get("/api/search", params={"id": rid}), 404, f"no image with id {rid}")


def test_upload_errors(client: TestClient, lib: tuple[Path, Path]) -> None:
    assert_error(client.post("/api/search", files={"image": ("x.jpg", b"not an image at all")}), 415, "not an image")
    truncated = (lib[0] / "rocket.jpg").read_bytes()[:2000]
    assert_error(client.post("/api/search", files={"image": ("t.jpg", truncated)}), 400)
    assert_error(client.post("/api/search", files={"image": ("e.jpg", b"")}), 400)
    assert_error(client.post("/api/search", files={"other": ("x.jpg", jpeg())}), 400, "image")
    assert_error(client.post("/api/search", data={"image": "text, not a file"}), 400, "image")
    assert_error(client.post("/api/search?k=0", files={"image": ("x.jpg", jpeg())}), 400, "k")
    assert client.get("/api/info").status_code == 200  # still serving


def test_upload_limits(lib: tuple[Path, Path]) -> None:
    c = TestClient(create_app(lib[1], max_upload_bytes=5000, max_pixels=100 * 100, warm_up=False), base_url=BASE)
    assert c.post("/api/search", files={"image": ("ok.jpg", jpeg((100, 100)))}).status_code == 200
    # over the pixel limit (a decompression bomb looks like this: a small file declaring many pixels)
    bomb = io.BytesIO()
    Image.new("L", (2000, 2000)).save(bomb, "PNG", optimize=True)
    assert len(bomb.getvalue()) < 5000
    assert_error(c.post("/api/search", files={"image": ("bomb.png", bomb.getvalue())}), 413, "too large")
    # over the byte limit: caught while reading the upload, and from Content-Length before parsing
    noisy = Image.effect_noise((200, 200), 80).convert("RGB")
    buf = io.BytesIO()
    noisy.save(buf, "JPEG", quality=95)
    assert 5000 < len(buf.getvalue()) < 60_000
    assert_error(c.post("/api/search", files={"image": ("big.jpg", buf.getvalue())}), 413, "upload over the limit")
    assert_error(c.post("/api/search", files={"image": ("huge.jpg", b"\xff" * 200_000)}), 413, "body over the limit")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while it streams
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
        for _ in range(100):
            yield b"\xff" * 10_000
        yield b"\r\n--b--\r\n"

    r = c.post("/api/search", content=chunked(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "body over the limit")
    assert c.get("/api/info").status_code == 200


# ---- images and thumbnails -----------------------------------------------------------------------------------
def test_image_file_is_served_by_id_only(client: TestClient, lib: tuple[Path, Path]) -> None:
    folder, index = lib
    rid = row_id(index, folder / "coffee.jpg")
    r = client.get(f"/api/images/{rid}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == (folder / "coffee.jpg").read_bytes()
    assert r.headers["x-content-type-options"] == "nosniff"
    assert_error(client.get("/api/images/99999"), 404, "no image")
    for bad in ("/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/%2Fetc%2Fpasswd", "/api/images/1.5",
                "/api/images/..", "/api/images/-1", "/api/images/1%00"):  # fmt: skip
        r = client.get(bad)
        assert r.status_code in (400, 404), bad
        assert b"root:" not in r.content
    first = min(ids_by_name(client).values())
    with IndexStore.open(index) as s:
        first_path = s.rows([first])[first].path
    r = client.get(f"/api/images/{first}", params={"path": "/etc/passwd"})  # extra parameters change nothing
    assert r.content == Path(first_path).read_bytes()


def test_thumbnail_is_an_upright_cached_jpeg(client: TestClient, lib: tuple[Path, Path]) -> None:
    folder, index = lib
    rid = row_id(index, folder / "rotated.jpg")
    r = client.get(f"/api/images/{rid}/thumbnail", params={"size": 150})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and im.size == (100, 150)  # the stored 300x200, turned by its EXIF orientation
    top, bottom = im.convert("RGB").getpixel((50, 10)), im.convert("RGB").getpixel((50, 140))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # red on top, as displayed
    state = client.app.state.simsearch
    before = len(state.thumbnails._items)
    assert client.get(f"/api/images/{rid}/thumbnail", params={"size": 150}).content == r.content
    assert len(state.thumbnails._items) == before  # answered from the cache
    big = Image.open(io.BytesIO(client.get(f"/api/images/{rid}/thumbnail?size=1024").content))
    assert big.size == (200, 300)  # never upscaled
    default = Image.open(
        io.BytesIO(client.get(f"/api/images/{row_id(index, folder / 'coffee.jpg')}/thumbnail").content)
    )
    assert max(default.size) == 256


@pytest.mark.parametrize("size", ["8", "15", "1025", "abc", "-1"])
def test_thumbnail_size_is_validated(client: TestClient, size: str) -> None:
    assert_error(client.get(f"/api/images/1/thumbnail?size={size}"), 400, "size")


def test_thumbnail_of_unknown_id_is_404(client: TestClient) -> None:
    assert_error(client.get("/api/images/99999/thumbnail"), 404)


def test_file_gone_from_disk_is_404(fresh: tuple[Path, Path]) -> None:
    folder, index = fresh
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    rid = row_id(index, folder / "camera.jpg")
    (folder / "camera.jpg").unlink()
    assert_error(c.get(f"/api/images/{rid}"), 404, "no longer on disk")
    assert_error(c.get(f"/api/images/{rid}/thumbnail"), 404, "no longer on disk")


# ---- duplicates ----------------------------------------------------------------------------------------------
def test_duplicates_groups_and_members(client: TestClient, lib: tuple[Path, Path]) -> None:
    folder, _ = lib
    r = client.get("/api/duplicates")
    assert r.status_code == 200
    rep = r.json()
    assert {"threshold", "groups", "duplicates", "group", "keep", "total_groups", "offset", "limit"} <= rep.keys()
    assert rep["group"] == "connected" and rep["total_groups"] == 2 and rep["duplicates"] == 2
    exact, near = rep["groups"]
    assert exact["kind"] == "exact" and near["kind"] == "near"
    assert exact["keep"] == str(folder / "chelsea.jpg") and exact["files"][0] == exact["keep"]
    assert near["keep"] == str(folder / "coffee.jpg")  # the larger one
    for g in rep["groups"]:
        assert [m["path"] for m in g["members"]] == g["files"] and [m["id"] for m in g["members"]] == g["ids"]
        assert [m["keep"] for m in g["members"]] == [True] + [False] * (len(g["files"]) - 1)
        assert all(m["size"] > 0 and m["width"] and m["height"] for m in g["members"])
    assert near["members"][1]["width"] < near["members"][0]["width"]
    assert 0.9 <= near["min_score"] < 1.0 and near["members"][1]["score"] == near["min_score"]


def test_duplicates_paging_and_modes(client: TestClient) -> None:
    full = client.get("/api/duplicates", params={"group": "star"}).json()
    page = client.get("/api/duplicates", params={"group": "star", "offset": 1, "limit": 1}).json()
    assert page["total_groups"] == full["total_groups"] == 2 and page["group"] == "star"
    assert page["groups"] == full["groups"][1:2] and (page["offset"], page["limit"]) == (1, 1)
    assert client.get("/api/duplicates", params={"offset": 5}).json()["groups"] == []
    loose = client.get("/api/duplicates", params={"threshold": 0.1, "group": "star"}).json()
    assert loose["total_groups"] >= 2 and loose["threshold"] == 0.1


@pytest.mark.parametrize(
    "params, text",
    [({"group": "blob"}, "group"), ({"threshold": 1.5}, "threshold"), ({"threshold": "x"}, "threshold"),
     ({"limit": 0}, "limit"), ({"offset": -1}, "offset"), ({"keep": "prettiest"}, "keep rule")],
)  # fmt: skip
def test_duplicates_bad_parameters_are_400(client: TestClient, params: dict, text: str) -> None:
    assert_error(client.get("/api/duplicates", params=params), 400, text)


def group_of(c: TestClient, name: str) -> dict:
    rep = c.get("/api/duplicates").json()
    return next(g for g in rep["groups"] if any(Path(f).name == name for f in g["files"]))


def test_resolve_trashes_the_chosen_file_and_undo_restores_it(fresh: tuple[Path, Path]) -> None:
    folder, index = fresh
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    g = group_of(c, "coffee.jpg")
    loser = g["members"][1]
    r = c.post("/api/duplicates/resolve", json={"ids": g["ids"], "remove": [loser["id"]]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["action"] == "delete" and out["undo"].endswith(".json") and "/" not in out["undo"]
    (moved,) = out["moved"]
    assert moved["id"] == loser["id"] and moved["from"] == loser["path"]
    assert not Path(loser["path"]).exists() and Path(moved["to"]).is_file()
    assert Path(moved["to"]).is_relative_to(index / "trash")
    assert (index / "undo" / out["undo"]).is_file()
    assert c.get("/api/info").json()["counts"]["images"] == 10
    assert_error(c.get(f"/api/images/{loser['id']}"), 404)
    (listed,) = c.get("/api/undo").json()["manifests"]
    assert listed["undo"] == out["undo"] and listed["files"] == 1 and listed["state"] == "done"
    assert len(c.get("/api/duplicates").json()["groups"]) == 1

    r = c.post("/api/undo", json={"undo": out["undo"]})
    assert r.status_code == 200, r.text
    assert r.json()["restored"] == 1 and r.json()["reindexed"] == 1
    assert Path(loser["path"]).is_file() and not Path(moved["to"]).exists()
    assert c.get("/api/info").json()["counts"]["images"] == 11  # the undo's own commit is noticed
    assert len(c.get("/api/duplicates").json()["groups"]) == 2


def test_resolve_refuses_bad_choices(fresh: tuple[Path, Path]) -> None:
    folder, index = fresh
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    g = group_of(c, "chelsea.jpg")
    other = group_of(c, "coffee.jpg")
    post = lambda body: c.post("/api/duplicates/resolve", json=body)  # noqa: E731
    assert_error(post({"ids": g["ids"], "remove": g["ids"]}), 400, "every file")
    assert_error(post({"ids": g["ids"], "remove": [other["ids"][1]]}), 400, "member")
    assert_error(post({"ids": g["ids"], "remove": []}), 400, "remove")
    assert_error(post({"ids": [g["ids"][0], other["ids"][1]], "remove": [other["ids"][1]]}), 409, "reload")
    assert_error(post({"ids": g["ids"], "remove": [g["ids"][1]], "action": "shred"}), 400, "action")
    assert_error(post({"ids": g["ids"], "remove": [g["ids"][1]], "action": "move"}), 403, "--move-to")
    assert_error(
        c.post("/api/duplicates/resolve", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert_error(c.post("/api/duplicates/resolve", content=json.dumps({"ids": g["ids"], "remove": [g["ids"][1]]}),
                        headers={"content-type": "text/plain"}), 400)  # fmt: skip
    assert all(Path(f).is_file() for f in g["files"] + other["files"])  # nothing moved


def test_resolve_while_another_writer_holds_the_lock_is_409(fresh: tuple[Path, Path]) -> None:
    folder, index = fresh
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    g = group_of(c, "chelsea.jpg")
    writer = IndexStore.open(index)
    writer.acquire_lock()
    try:
        assert_error(c.post("/api/duplicates/resolve", json={"ids": g["ids"], "remove": [g["ids"][1]]}), 409,
                     "being written")  # fmt: skip
        assert all(Path(f).is_file() for f in g["files"])
        assert not (index / "undo").exists()
    finally:
        writer.close()
    r = c.post("/api/duplicates/resolve", json={"ids": g["ids"], "remove": [g["ids"][1]]})
    assert r.status_code == 200
    writer = IndexStore.open(index)
    writer.acquire_lock()
    try:
        assert_error(c.post("/api/undo", json={"undo": r.json()["undo"]}), 409, "being written")
        assert not Path(g["files"][1]).exists()  # nothing was moved back
    finally:
        writer.close()


def test_resolve_move_needs_and_uses_the_configured_folder(fresh: tuple[Path, Path], tmp_path: Path) -> None:
    folder, index = fresh
    dest = tmp_path / "dupes"
    c = TestClient(create_app(index, move_to=dest, warm_up=False), base_url=BASE)
    assert c.get("/api/info").json()["server"]["move"] is True
    g = group_of(c, "chelsea.jpg")
    r = c.post("/api/duplicates/resolve", json={"ids": g["ids"], "remove": [g["ids"][1]], "action": "move"})
    assert r.status_code == 200, r.text
    assert r.json()["moved"][0]["to"] == str(dest / "copies" / "chelsea-copy.jpg")
    assert (dest / "copies" / "chelsea-copy.jpg").is_file()


def test_resolve_refuses_a_forged_threshold_and_moves_nothing(fresh: tuple[Path, Path]) -> None:
    folder, index = fresh
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    before = sorted(p for p in folder.rglob("*") if p.is_file())
    loose = c.get("/api/duplicates", params={"threshold": -1, "group": "star"}).json()["groups"][0]
    for t in (-1, 0.0, 0.79, 1.01):
        body = {"ids": loose["ids"], "remove": loose["ids"][1:], "threshold": t, "group": "star"}
        assert_error(c.post("/api/duplicates/resolve", json=body), 400, "threshold")
    assert sorted(p for p in folder.rglob("*") if p.is_file()) == before and not (index / "undo").exists()


def test_undo_replays_only_actions_of_the_journal(fresh: tuple[Path, Path], tmp_path: Path) -> None:
    folder, index = fresh
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    g = group_of(c, "chelsea.jpg")
    name = c.post("/api/duplicates/resolve", json={"ids": g["ids"], "remove": [g["ids"][1]]}).json()["undo"]
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"x")
    crafted = {"action": "move", "entries": [{"from": str(tmp_path / "taken.jpg"), "to": str(victim), "done": True}]}
    (index / "undo" / "20990101-000000-move.json").write_text(json.dumps(crafted))
    assert [m["undo"] for m in c.get("/api/undo").json()["manifests"]] == [name]
    assert_error(c.post("/api/undo", json={"undo": "20990101-000000-move.json"}), 404)
    assert_error(c.post("/api/undo", json={"undo": name + "\n"}), 400)
    assert victim.is_file() and not (tmp_path / "taken.jpg").exists()
    assert c.post("/api/undo", json={"undo": name}).json()["restored"] == 1


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "x/../y.json", ".hidden.json", "a.txt", ""])
def test_undo_takes_manifest_names_only(client: TestClient, name: str) -> None:
    assert_error(client.post("/api/undo", json={"undo": name}), 400)


def test_undo_unknown_manifest_is_404(client: TestClient) -> None:
    assert_error(client.post("/api/undo", json={"undo": "20990101-000000-delete.json"}), 404)
    assert_error(client.post("/api/undo"), 400)


def test_read_only_refuses_every_change(fresh: tuple[Path, Path]) -> None:
    folder, index = fresh
    c = TestClient(create_app(index, read_only=True, warm_up=False), base_url=BASE)
    assert c.get("/api/info").json()["server"]["read_only"] is True
    g = group_of(c, "chelsea.jpg")
    assert_error(c.post("/api/duplicates/resolve", json={"ids": g["ids"], "remove": [g["ids"][1]]}), 403, "read-only")
    assert_error(c.post("/api/undo", json={"undo": "20261201-000000-delete.json"}), 403, "read-only")
    assert all(Path(f).is_file() for f in g["files"]) and not (index / "undo").exists()
    assert c.get("/api/search", params={"id": g["ids"][0]}).status_code == 200  # reading still works


# ---- generation check ----------------------------------------------------------------------------------------
def test_a_sync_by_another_process_is_noticed_without_restart(fresh: tuple[Path, Path], photos: Path) -> None:
    folder, index = fresh
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    gen = c.get("/api/info").json()["server"]["generation"]
    new = edited(photos / "retina.jpg", folder / "retina-small.jpg", scale=0.6, quality=70)
    (folder / "camera.jpg").unlink()
    r = CliRunner().invoke(cli_app, ["index", str(folder), "--index", str(index), "--json"])
    assert r.exit_code == 0, r.stderr
    info = c.get("/api/info").json()
    assert info["counts"]["images"] == 11 and info["server"]["generation"] > gen
    rid = row_id(index, new)
    out = c.get("/api/search", params={"id": rid, "k": 2}).json()
    assert out["matches"][0]["path"] == str(new) and out["matches"][1]["path"] == str(folder / "retina.jpg")
    assert all(
        not m["path"].endswith("camera.jpg")
        for m in c.get("/api/search", params={"id": rid, "k": 20}).json()["matches"]
    )
    assert c.get(f"/api/images/{rid}/thumbnail").status_code == 200


# ---- security ------------------------------------------------------------------------------------------------
def test_token_is_required_on_the_api(lib: tuple[Path, Path]) -> None:
    c = TestClient(create_app(lib[1], token="s3cret-token", warm_up=False), base_url="http://example.org")
    assert_error(c.get("/api/info"), 401, "token")
    assert c.get("/api/info").headers["www-authenticate"] == "Bearer"
    assert_error(c.get("/api/info", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(c.get("/api/info", headers={"Authorization": "s3cret-token"}), 401)
    assert_error(c.get("/api/images/1", headers={"Authorization": "Bearer s3cret-tokenX"}), 401)
    assert_error(c.post("/api/search", files={"image": ("x.jpg", jpeg())}), 401)
    assert_error(c.post("/api/undo", json={"undo": "a.json"}), 401)
    ok = {"Authorization": "Bearer s3cret-token"}
    assert c.get("/api/info", headers=ok).status_code == 200  # any Host once a token is required
    assert c.post("/api/search", files={"image": ("x.jpg", jpeg())}, headers=ok).status_code == 200
    page = c.get("/")  # the page and its scripts hold no data: served without a token
    assert page.status_code == 200 and b"simsearch" in page.content


def test_without_token_only_loopback_host_headers(client: TestClient) -> None:
    for host in ("evil.example", "192.168.1.20:8000", "localhost.evil.example"):
        assert_error(client.get("/api/info", headers={"host": host}), 400, "host")
        assert_error(client.get("/", headers={"host": host}), 400, "host")
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200


def test_cross_origin_changes_are_refused_and_no_cors(client: TestClient) -> None:
    r = client.post("/api/undo", json={"undo": "x.json"}, headers={"origin": "http://evil.example"})
    assert_error(r, 403, "cross-origin")
    r = client.post("/api/search", files={"image": ("x.jpg", jpeg())}, headers={"origin": "http://evil.example"})
    assert_error(r, 403)
    r = client.post("/api/search", files={"image": ("x.jpg", jpeg())}, headers={"origin": BASE})
    assert r.status_code == 200  # same origin: the page itself
    r = client.get("/api/info", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = client.options(
        "/api/search", headers={"origin": "http://evil.example", "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.0.1", "::", "example.org", ""]))


def test_cli_refuses_a_public_host_without_token(lib: tuple[Path, Path]) -> None:
    r = CliRunner().invoke(cli_app, ["serve", "--index", str(lib[1]), "--host", "0.0.0.0"])
    assert r.exit_code == 1
    assert (
        r.stderr.strip() == "simsearch: error: --host 0.0.0.0 is reachable from other machines: pass --token TOKEN too"
    )


def test_cli_serve_on_a_missing_index_is_a_one_line_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli_app, ["serve", "--index", str(tmp_path / "nope")])
    assert r.exit_code == 2
    assert r.stderr.strip() == f"simsearch: error: no index at {tmp_path / 'nope'}"


# ---- robustness ----------------------------------------------------------------------------------------------
def test_unknown_routes_and_methods_are_json(client: TestClient) -> None:
    assert_error(client.get("/api/nope"), 404)
    assert_error(client.delete("/api/info"), 405)
    assert_error(client.get("/static/nope.js"), 404)


def test_unexpected_errors_are_500_json_and_the_server_keeps_serving(lib: tuple[Path, Path], monkeypatch) -> None:  # noqa: ANN001
    c = TestClient(create_app(lib[1], warm_up=False), base_url=BASE, raise_server_exceptions=False)
    state = c.app.state.simsearch

    def boom(*a: object) -> None:
        raise RuntimeError("secret internal detail\nTraceback (most recent call last)")

    monkeypatch.setattr(state, "search_id", boom)
    r = c.get("/api/search", params={"id": 1})
    assert_error(r, 500, "internal error (RuntimeError)")
    assert "secret" not in r.text
    assert c.get("/api/info").status_code == 200


def test_docs_and_openapi(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/info", "/api/images/{image_id}", "/api/images/{image_id}/thumbnail",
            "/api/duplicates", "/api/duplicates/resolve", "/api/undo"} <= set(spec["paths"])  # fmt: skip
    assert client.get("/docs").status_code == 200


def test_page_and_assets_are_packaged(client: TestClient) -> None:
    r = client.get("/")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    assert '<script src="/static/app.js">' in page and "/static/app.css" in page
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    for asset in ("app.js", "app.css"):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
