"""The server serves only the library, survives bad input and huge images, and talks to its own origin only.

Issue 20 items 3, 5, 6 and 7: roots and fingerprints (symlink swaps, changed files, imports), truncated and
header-only images, FIFOs, huge ids, the rerank time limit, CORP and Sec-Fetch-Site, HTTPS, and the decode budget
under 16 concurrent uploads of a 7000x7000 PNG in a separate server process (peak RSS measured).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app as cli_app
from simsearch.index.store import IndexStore

from .serve_util import build_index, build_library

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from simsearch.serve.app import create_app  # noqa: E402

BASE = "http://127.0.0.1"
WT = str(Path(__file__).resolve().parents[1])  # run child processes on this checkout, not an installed copy
CLI = "import sys; from simsearch.cli import main; sys.argv[0] = 'simsearch'; main()"


@pytest.fixture(scope="module")
def lib(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("safety-lib")
    folder = build_library(photos, d / "lib")
    return folder, build_index(folder, d / "idx")


@pytest.fixture(scope="module")
def client(lib: tuple[Path, Path]) -> TestClient:
    return TestClient(create_app(lib[1], warm_up=False), base_url=BASE)


@pytest.fixture
def fresh(photos: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = build_library(photos, tmp_path / "lib")
    return folder, build_index(folder, tmp_path / "idx")


def rid(index: Path, path: Path) -> int:
    with IndexStore.open(index) as s:
        row = s.row_by_path(str(path))
        assert row is not None
        return row.id


def assert_error(r: httpx.Response, status: int, text: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"]
    assert text.lower() in body["error"].lower(), body["error"]
    assert r.headers["cross-origin-resource-policy"] == "same-origin"


def cli(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli_app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": WT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def jpeg_bytes(size: tuple[int, int] = (200, 150)) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 1
    Image.effect_noise(size, 60).convert("RGB").save(buf, "JPEG", exif=exif)
    return buf.getvalue()


# ---- 3. only the library: roots, links, fingerprints -------------------------------------------------------------
def test_index_records_its_folder_as_a_root(lib: tuple[Path, Path]) -> None:
    folder, index = lib
    with IndexStore.open(index) as s:
        assert s.roots == [os.path.realpath(folder)]
    info = TestClient(create_app(index, warm_up=False), base_url=BASE).get("/api/info").json()
    assert info["roots"] == [os.path.realpath(folder)]
    assert info["server"]["max_rerank"] == 200 and info["server"]["rerank_seconds"] == 10.0


def test_add_roots_is_durable_idempotent_and_needs_no_new_generation(tmp_path: Path) -> None:
    sig = {"backbone": "x", "weights_digest": "d", "input_size": 0, "pooling": "p", "dim": 4, "fit": "f",
           "precision": "p"}  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    with IndexStore.create(tmp_path / "idx", sig) as s:
        assert s.roots == []
        gen = s.generation
        s.add_roots([str(tmp_path / "link"), tmp_path / "a"])
        s.add_roots([str(tmp_path / "a")])
        assert s.roots == [os.path.realpath(tmp_path / "a")] and s.generation == gen
    with sqlite3.connect(tmp_path / "idx" / "meta.sqlite") as c:  # committed, as a plain meta row
        assert json.loads(c.execute("SELECT value FROM meta WHERE key='roots'").fetchone()[0]) == [
            os.path.realpath(tmp_path / "a")
        ]


def test_symlink_swap_to_a_file_outside_the_folder_is_404(fresh: tuple[Path, Path], tmp_path: Path) -> None:
    folder, index = fresh
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    shutil.copy(folder / "camera.jpg", secret)  # same bytes, even same size: only the location gives it away
    st = (folder / "camera.jpg").stat()
    os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns))
    i = rid(index, folder / "camera.jpg")
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    assert c.get(f"/api/images/{i}").status_code == 200
    (folder / "camera.jpg").unlink()
    (folder / "camera.jpg").symlink_to(secret)
    assert_error(c.get(f"/api/images/{i}"), 404, "outside the folders")
    assert_error(c.get(f"/api/images/{i}/thumbnail"), 404, "outside the folders")
    # a whole folder swapped for a link leading out of the library
    j = rid(index, folder / "copies" / "chelsea-copy.jpg")
    shutil.move(folder / "copies", tmp_path / "outside" / "copies")
    (folder / "copies").symlink_to(tmp_path / "outside" / "copies")
    assert_error(c.get(f"/api/images/{j}"), 404, "outside the folders")


def test_symlink_swap_to_another_indexed_file_is_409(fresh: tuple[Path, Path]) -> None:
    folder, index = fresh
    i = rid(index, folder / "coffee.jpg")
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    (folder / "coffee.jpg").unlink()
    (folder / "coffee.jpg").symlink_to(folder / "rocket.jpg")
    assert_error(c.get(f"/api/images/{i}"), 409, "changed since it was indexed")
    assert_error(c.get(f"/api/images/{i}/thumbnail"), 409, "changed since it was indexed")


def test_file_modified_after_indexing_is_409(fresh: tuple[Path, Path]) -> None:
    folder, index = fresh
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    i = rid(index, folder / "rocket.jpg")
    assert c.get(f"/api/images/{i}/thumbnail").status_code == 200  # cached now: the cache must not hide a change
    p = folder / "rocket.jpg"
    st = p.stat()
    p.write_bytes(p.read_bytes()[:-500])  # truncated in place
    assert_error(c.get(f"/api/images/{i}"), 409, "changed since it was indexed")
    assert_error(c.get(f"/api/images/{i}/thumbnail"), 409, "changed since it was indexed")
    # same size, mtime put back, bytes damaged: the fingerprint holds, the decode does not
    data = bytearray((folder / "chelsea.jpg").read_bytes())
    j = rid(index, folder / "chelsea.jpg")
    st = (folder / "chelsea.jpg").stat()
    data[200:] = b"\x00" * (len(data) - 200)
    (folder / "chelsea.jpg").write_bytes(bytes(data))
    os.utime(folder / "chelsea.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert_error(c.get(f"/api/images/{j}"), 409, "does not decode")
    assert_error(c.get(f"/api/images/{j}/thumbnail"), 409, "does not decode")


def test_a_non_image_at_an_indexed_path_is_never_sent(fresh: tuple[Path, Path]) -> None:
    folder, index = fresh
    i = rid(index, folder / "retina.jpg")
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    p = folder / "retina.jpg"
    st = p.stat()
    p.write_bytes(b"<html><script>alert(1)</script>".ljust(st.st_size, b" "))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = c.get(f"/api/images/{i}")
    assert r.status_code == 404 and b"script" not in r.content


def test_originals_are_streamed_with_their_image_type(client: TestClient, lib: tuple[Path, Path]) -> None:
    folder, index = lib
    r = client.get(f"/api/images/{rid(index, folder / 'astronaut.jpg')}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == (folder / "astronaut.jpg").read_bytes()
    assert int(r.headers["content-length"]) == len(r.content)


def test_an_index_without_roots_serves_no_files(fresh: tuple[Path, Path]) -> None:
    """An index made before roots were recorded: its files are not served until `index FOLDER` runs again."""
    folder, index = fresh
    with sqlite3.connect(index / "meta.sqlite") as c:
        c.execute("DELETE FROM meta WHERE key='roots'")
    i = rid(index, folder / "camera.jpg")
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    assert c.get("/api/info").status_code == 200  # it still opens and searches
    assert c.get("/api/search", params={"id": i, "k": 2}).status_code == 200
    assert_error(c.get(f"/api/images/{i}"), 404, "simsearch index FOLDER")
    assert_error(c.get(f"/api/images/{i}/thumbnail"), 404, "--root")
    code, _, err = cli("index", folder, "--index", index)  # a no-op sync that records the folder
    assert code == 0, err
    assert c.get(f"/api/images/{i}").status_code == 200


def _vectors(tmp_path: Path, paths: list[str], dim: int = 8) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", rng.normal(size=(len(paths), dim)).astype(np.float32))
    (tmp_path / "p.txt").write_text("".join(p + "\n" for p in paths))
    return tmp_path / "v.npy", tmp_path / "p.txt"


def test_import_outside_the_roots_is_refused_and_nothing_is_imported(photos: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    shutil.copytree(photos, lib)
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(photos / "camera.jpg", outside)
    v, p = _vectors(tmp_path, [str(lib / "chelsea.jpg"), str(outside)])
    code, _, err = cli("import", v, p, "--index", tmp_path / "idx", "--root", lib)
    assert code == 1 and err.startswith("simsearch: error: ") and str(outside) in err and "--root" not in err
    assert "outside the given roots" in err and err.count("\n") == 1
    assert not IndexStore.exists(tmp_path / "idx")  # nothing created, nothing imported
    # a link inside the root that leads out of it is outside too
    (lib / "sneaky.jpg").symlink_to(outside)
    v, p = _vectors(tmp_path, [str(lib / "sneaky.jpg")])
    assert cli("import", v, p, "--index", tmp_path / "idx", "--root", lib)[0] == 1


def test_import_with_roots_serves_inside_them_and_without_roots_serves_nothing(photos: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    shutil.copytree(photos, lib)
    v, p = _vectors(tmp_path, [str(lib / "chelsea.jpg"), str(lib / "coffee.jpg")])
    assert cli("import", v, p, "--index", tmp_path / "rooted", "--root", lib)[0] == 0
    assert cli("import", v, p, "--index", tmp_path / "bare")[0] == 0
    with IndexStore.open(tmp_path / "rooted") as s:
        assert s.roots == [os.path.realpath(lib)]
    ok = TestClient(create_app(tmp_path / "rooted", warm_up=False), base_url=BASE)
    r = ok.get(f"/api/images/{rid(tmp_path / 'rooted', lib / 'chelsea.jpg')}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    bare = TestClient(create_app(tmp_path / "bare", warm_up=False), base_url=BASE)
    for url in ("/api/images/{}", "/api/images/{}/thumbnail"):
        assert_error(bare.get(url.format(rid(tmp_path / "bare", lib / "chelsea.jpg"))), 404, "--root")


# ---- 5. bad input everywhere ---------------------------------------------------------------------------------------
def _bad_images() -> dict[str, bytes]:
    data = jpeg_bytes()
    sos = data.index(b"\xff\xda")
    png = io.BytesIO()
    Image.effect_noise((300, 300), 60).convert("RGB").save(png, "PNG")
    p = png.getvalue()
    return {"soi-app0.jpg": data[:20], "header-only.jpg": data[:sos], "cut-header.jpg": data[:30],
            "cut-scan.jpg": data[: sos + 60], "cut-idat.png": p[: p.index(b"IDAT") + 300]}  # fmt: skip


@pytest.mark.parametrize("name", list(_bad_images()))
def test_truncated_and_header_only_uploads_are_400(client: TestClient, name: str) -> None:
    data = _bad_images()[name]
    for rerank in (0, 5):
        r = client.post("/api/search", params={"rerank": rerank}, files={"image": (name, data, "image/jpeg")})
        assert_error(r, 400)
    assert client.get("/api/info").status_code == 200


def test_upload_kinds_and_limits(lib: tuple[Path, Path]) -> None:
    c = TestClient(create_app(lib[1], max_pixels=500 * 500, warm_up=False), base_url=BASE)
    big = io.BytesIO()
    Image.new("RGB", (800, 800)).save(big, "PNG")
    assert_error(c.post("/api/search", files={"image": ("big.png", big.getvalue())}), 413, "too large")
    assert_error(c.post("/api/search", files={"image": ("x.txt", b"hello, not an image")}), 415, "not an image")


def test_thumbnails_of_truncated_library_files_are_not_500(fresh: tuple[Path, Path], tmp_path: Path) -> None:
    folder, index = fresh
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    p = folder / "coffee.jpg"
    i = rid(index, p)
    for data in _bad_images().values():
        p.write_bytes(data)  # an indexed photo replaced by a truncated one
        for url in (f"/api/images/{i}/thumbnail", f"/api/images/{i}"):
            assert_error(c.get(url), 409, "changed since it was indexed")
    # imported rows carry no fingerprint: a truncated file inside the roots is decoded, and refused
    names = list(_bad_images())
    for name, data in _bad_images().items():
        (folder / name).write_bytes(data)
    v, paths = _vectors(tmp_path, [str(folder / n) for n in names])
    assert cli("import", v, paths, "--index", tmp_path / "imported", "--root", folder)[0] == 0
    c = TestClient(create_app(tmp_path / "imported", warm_up=False), base_url=BASE)
    for name in names:
        j = rid(tmp_path / "imported", folder / name)
        for url in (f"/api/images/{j}/thumbnail", f"/api/images/{j}"):
            assert_error(c.get(url), 409, "does not decode")


@pytest.mark.parametrize("route", ["/api/images/{}", "/api/images/{}/thumbnail", "/api/search?id={}"])
@pytest.mark.parametrize("image_id", [2**63, 2**63 - 1, -1, -(2**63) - 1, 10**40])
def test_ids_outside_the_range_are_404(client: TestClient, route: str, image_id: int) -> None:
    assert_error(client.get(route.format(image_id)), 404, f"no image with id {image_id}")


def test_query_of_a_truncated_jpeg_names_the_file(lib: tuple[Path, Path], tmp_path: Path) -> None:
    for name, data in _bad_images().items():
        q = tmp_path / name
        q.write_bytes(data)
        for extra in ([], ["--rerank", "3"]):
            code, out, err = cli("query", q, "--index", lib[1], *extra)
            assert code == 1 and out == "", err
            assert err.startswith(f"simsearch: error: {q}: ") and err.count("\n") == 1, err
            assert "unexpected" not in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_query_of_a_fifo_fails_at_once(lib: tuple[Path, Path], tmp_path: Path) -> None:
    """In a real process with a timeout: a hang (opening the FIFO waits for a writer) fails the test."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for target in (fifo, tmp_path, Path("/dev/zero")):
        t0 = time.monotonic()
        try:
            r = subprocess.run([sys.executable, "-c", CLI, "query", str(target), "--index", str(lib[1])],
                               capture_output=True, text=True, timeout=60, env=env())  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"simsearch query {target} hung")
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith(f"simsearch: error: {target}: ") and r.stderr.count("\n") == 1, r.stderr
        assert ("FIFO" if target == fifo else "directory" if target == tmp_path else "device") in r.stderr
        assert time.monotonic() - t0 < 30


def test_rerank_is_capped_and_time_bounded(lib: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cv2")
    folder, index = lib
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    assert_error(c.get("/api/search", params={"id": 1, "rerank": 201}), 400, "rerank")
    i = rid(index, folder / "astronaut.jpg")
    r = c.get("/api/search", params={"id": i, "k": 3, "rerank": 20})
    assert r.status_code == 200 and r.json()["rerank"] == {"candidates": 11, "checked": 11, "complete": True}
    assert "rerank" not in c.get("/api/search", params={"id": i, "k": 3}).json()

    from simsearch.spatial import rerank as rr

    real = rr.verify_candidates

    def slow(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(rr, "verify_candidates", slow)
    monkeypatch.setattr("simsearch.api.RerankJob.CHUNK", 2)
    slow_app = TestClient(create_app(index, warm_up=False, rerank_seconds=1.0), base_url=BASE)
    t0 = time.monotonic()
    out = slow_app.get("/api/search", params={"id": i, "k": 11, "rerank": 11}).json()
    assert time.monotonic() - t0 < 4
    info = out["rerank"]
    assert info["complete"] is False and 0 < info["checked"] < 11 and info["candidates"] == 11
    unchecked = [m for m in out["matches"] if "inliers" not in m]
    assert len(unchecked) == 11 - info["checked"]
    scores = [m["score"] for m in unchecked]
    assert scores == sorted(scores, reverse=True)  # the rest keep their global order


def test_rerank_reads_no_file_outside_the_roots(fresh: tuple[Path, Path], tmp_path: Path) -> None:
    """A candidate swapped for a link to a file outside the folder is not read for features (inliers 0, although
    the outside file is the query itself); a query whose file is not readable is a 400, not a 500."""
    pytest.importorskip("cv2")
    folder, index = fresh
    outside = tmp_path / "outside.jpg"
    shutil.copy(folder / "astronaut.jpg", outside)
    (folder / "camera.jpg").unlink()
    (folder / "camera.jpg").symlink_to(outside)
    c = TestClient(create_app(index, warm_up=False), base_url=BASE)
    q, cam = rid(index, folder / "astronaut.jpg"), rid(index, folder / "camera.jpg")
    out = c.get("/api/search", params={"id": q, "k": 11, "rerank": 11}).json()
    by_id = {m["id"]: m for m in out["matches"]}
    assert by_id[q]["inliers"] >= 100 and by_id[cam]["inliers"] == 0
    assert c.get("/api/search", params={"id": cam, "k": 3}).status_code == 200  # the stored vector still searches
    assert_error(c.get("/api/search", params={"id": cam, "k": 3, "rerank": 5}), 400, "cannot be read for re-ranking")


# ---- 6. same origin only -------------------------------------------------------------------------------------------
def test_corp_on_every_kind_of_response(client: TestClient, lib: tuple[Path, Path]) -> None:
    folder, index = lib
    i = rid(index, folder / "chelsea.jpg")
    responses = {
        "json": client.get("/api/info"),
        "image": client.get(f"/api/images/{i}"),
        "thumbnail": client.get(f"/api/images/{i}/thumbnail"),
        "error": client.get("/api/images/99999"),
        "validation": client.get("/api/search", params={"id": "x"}),
        "static": client.get("/static/app.js"),
        "page": client.get("/"),
        "unknown route": client.get("/nope"),
        "guard refusal": client.get("/api/info", headers={"host": "evil.example"}),
        "body too large": client.post("/api/search", content=b"x" * 30_000_000,
                                      headers={"content-type": "multipart/form-data; boundary=b"}),
    }  # fmt: skip
    for what, r in responses.items():
        assert r.headers.get("cross-origin-resource-policy") == "same-origin", what
        assert r.headers.get("x-content-type-options") == "nosniff", what
        assert r.headers.get_list("cross-origin-resource-policy") == ["same-origin"], what
    assert responses["static"].status_code == 200 and responses["guard refusal"].status_code == 400


def test_corp_on_unexpected_500(lib: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from simsearch.serve.state import ServeState

    def boom(self, *a):  # noqa: ANN001, ANN002, ANN202
        raise RuntimeError("boom")

    c = TestClient(create_app(lib[1], warm_up=False), base_url=BASE, raise_server_exceptions=False)
    monkeypatch.setattr(ServeState, "thumbnail", boom)
    r = c.get("/api/images/1/thumbnail")
    assert r.status_code == 500 and r.headers["cross-origin-resource-policy"] == "same-origin"


@pytest.mark.parametrize("site", ["cross-site", "same-site", "CROSS-SITE"])
def test_requests_from_other_sites_are_403(client: TestClient, lib: tuple[Path, Path], site: str) -> None:
    folder, index = lib
    i = rid(index, folder / "chelsea.jpg")
    h = {"sec-fetch-site": site, "sec-fetch-mode": "no-cors", "sec-fetch-dest": "image"}
    assert_error(client.get(f"/api/images/{i}/thumbnail", headers=h), 403, "another site")
    assert_error(client.get("/api/search", params={"id": i, "rerank": 200}, headers={**h, "sec-fetch-mode": "cors"}),
                 403, "another site")  # fmt: skip
    nav = {"sec-fetch-site": site, "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
    assert_error(client.get(f"/api/images/{i}", headers=nav), 403)  # no way into the API, not even a link
    assert client.get("/", headers=nav).status_code == 200  # a link from elsewhere to the page still opens it
    assert_error(client.get("/", headers={**nav, "sec-fetch-mode": "no-cors", "sec-fetch-dest": "iframe"}), 403)


@pytest.mark.parametrize("site", [None, "same-origin", "none"])
def test_same_origin_and_direct_requests_are_answered(client: TestClient, site: str | None) -> None:
    assert client.get("/api/info", headers={"sec-fetch-site": site} if site else {}).status_code == 200


def test_foreign_origin_on_a_change_is_still_403(client: TestClient) -> None:
    r = client.post("/api/undo", json={"undo": "x.json"}, headers={"origin": "http://evil.example"})
    assert_error(r, 403, "cross-origin")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1: with the `cryptography` package, else the openssl command, else skip."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl is available")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)  # fmt: skip
        return cert, key
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
         .sign(k, hashes.SHA256()))  # fmt: skip
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))  # fmt: skip
    return cert, key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, **kw: object) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            httpx.get(url, timeout=2, **kw)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the server did not start")


def test_serve_https_with_a_certificate(lib: tuple[Path, Path], tmp_path: Path) -> None:
    """`simsearch serve --ssl-certfile --ssl-keyfile` in a real process; one request over HTTPS with the token."""
    cert, key = _self_signed(tmp_path)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--index", str(lib[1]), "--port", str(port),
                             "--token", "s3cret", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env())  # fmt: skip
    try:
        import ssl

        trust = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{port}"
        _wait_ready(url + "/api/info", proc, verify=trust)
        r = httpx.get(url + "/api/info", headers={"authorization": "Bearer s3cret"}, verify=trust, timeout=10)
        assert r.status_code == 200 and r.json()["counts"]["images"] == 11
        assert r.headers["cross-origin-resource-policy"] == "same-origin"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=5)  # no plain HTTP on that port
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"at https://127.0.0.1:{port}/" in err and "warning" not in err


def test_token_over_plain_http_warns_and_tls_options_are_checked(
    lib: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    code, _, err = cli("serve", "--index", lib[1], "--host", "0.0.0.0", "--token", "t")
    assert code == 0 and "simsearch: warning: the token travels in clear text over plain HTTP" in err
    assert "ssl_certfile" not in calls[-1]
    for args in (["--host", "127.0.0.1", "--token", "t"], ["--host", "127.0.0.1"]):  # loopback: no warning
        code, _, err = cli("serve", "--index", lib[1], *args)
        assert code == 0 and "warning" not in err
    cert, key = _self_signed(tmp_path)
    code, _, err = cli("serve", "--index", lib[1], "--host", "0.0.0.0", "--token", "t", "--ssl-certfile", cert,
                       "--ssl-keyfile", key)  # fmt: skip
    assert code == 0 and "warning" not in err and "at https://0.0.0.0:8000/" in err
    assert calls[-1]["ssl_certfile"] == str(cert) and calls[-1]["ssl_keyfile"] == str(key)
    n = len(calls)
    bad_options = [(["--ssl-certfile", cert], "go together"),
                   (["--ssl-certfile", key, "--ssl-keyfile", key], "cannot use"),
                   (["--ssl-certfile", tmp_path / "no.pem", "--ssl-keyfile", key], "not found")]  # fmt: skip
    for bad, text in bad_options:
        code, _, err = cli("serve", "--index", lib[1], *bad)
        assert code == 1 and err.startswith("simsearch: error: ") and text in err and err.count("\n") == 1, err
    assert len(calls) == n  # refused before serving


# ---- 7. the decode budget ------------------------------------------------------------------------------------------
def test_budget_waits_a_huge_image_runs_alone_nesting_never_waits() -> None:
    from simsearch.decode_budget import DecodeBudget, DecodeBusyError

    b = DecodeBudget(100)
    started = threading.Event()
    got: list[int] = []

    def big() -> None:
        with b.hold(500):  # more than the whole budget: capped, and waits until nothing else decodes
            got.append(b.in_flight)
            started.set()

    with b.hold(60):
        t = threading.Thread(target=big)
        t.start()
        assert not started.wait(0.3) and b.in_flight == 60
    assert started.wait(5)
    t.join(5)
    assert got == [100] and b.in_flight == 0 and b.peak == 100

    b2 = DecodeBudget(100, wait_s=0.2)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with b2.hold(10):
                pass
        except DecodeBusyError as e:
            errors.append(e)

    with b2.hold(100):
        with b2.hold(10):  # nested on the same thread: never waits (no deadlock)
            assert b2.in_flight == 110
        t = threading.Thread(target=other)
        t.start()
        t.join(5)
    assert len(errors) == 1 and "busy" in str(errors[0]) and b2.in_flight == 0


def test_sixteen_concurrent_huge_uploads_in_a_server_process(lib: tuple[Path, Path], tmp_path: Path) -> None:
    """16 uploads at once of a 7000x7000 PNG (160 KB on disk, 196 MB decoded): every one answered within 60 s,
    the server's peak RSS (VmHWM) under 1.5 GiB. Before the decode budget this took the server past 3 GB."""
    big = io.BytesIO()
    im = Image.new("RGB", (7000, 7000), (30, 120, 200))
    im.paste((200, 10, 10), (1000, 1000, 3000, 5000))
    im.save(big, "PNG", optimize=True)
    data = big.getvalue()
    assert len(data) < 1_000_000
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--index", str(lib[1]), "--port", str(port)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env())  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    results: list[tuple[int | str, float]] = []
    try:
        _wait_ready(url + "/api/info", proc)

        def upload() -> None:
            t = time.monotonic()
            try:
                r = httpx.post(url + "/api/search", params={"k": 3}, files={"image": ("big.png", data)}, timeout=90)
                results.append((r.status_code, time.monotonic() - t))
            except httpx.HTTPError as e:
                results.append((type(e).__name__, time.monotonic() - t))

        threads = [threading.Thread(target=upload) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        status = Path(f"/proc/{proc.pid}/status")
        hwm = next((int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                    if line.startswith("VmHWM")), None) if status.exists() else None  # fmt: skip
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    worst = max(s for _, s in results)
    print(f"16 uploads of 7000x7000: worst {worst:.1f} s, peak RSS {hwm and hwm / 2**20:.0f} MiB")
    assert len(results) == 16 and all(code == 200 for code, _ in results), results
    assert worst < 60
    if hwm is None:
        pytest.skip("no /proc to read the server's peak RSS")
    assert hwm < 1.5 * 2**30, f"peak RSS {hwm / 2**20:.0f} MiB"
