"""Object storage: index, sync and query an s3:// prefix, against moto's S3 server started on localhost."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simsearch.cli import app

from .test_dedup_actions import run_json

pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")
runner = CliRunner()


@pytest.fixture(scope="module")
def s3() -> Iterator[object]:
    """A real S3 HTTP endpoint on 127.0.0.1 (moto_server), the environment pointing at it, a client."""
    server = shutil.which("moto_server")
    if server is None:
        pytest.skip("moto_server is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        client.create_bucket(Bucket="photos")
        yield client
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_index_sync_query_and_dedup_an_s3_prefix(s3, photos: Path, tmp_path: Path) -> None:
    client = s3
    for p in sorted(photos.glob("*.jpg")):
        client.upload_file(str(p), "photos", f"lib/{p.name}")
    client.upload_file(str(photos / "chelsea.jpg"), "photos", "lib/copies/chelsea-copy.jpg")
    client.put_object(Bucket="photos", Key="lib/notes.txt", Body=b"not a photo")
    client.put_object(Bucket="photos", Key="lib/broken.jpg", Body=b"\xff\xd8\xff\xe0 truncated")
    index = tmp_path / "idx"
    rep = run_json("index", "s3://photos/lib", "--index", index)
    assert rep["added"] == 9 and [s["path"] for s in rep["skipped"]] == ["s3://photos/lib/broken.jpg"]
    assert run_json("info", "--index", index)["roots"] == ["s3://photos/lib"]

    (hit, *_) = run_json("query", "s3://photos/lib/coffee.jpg", "--index", index)["results"][0]["matches"]
    assert hit["path"] == "s3://photos/lib/coffee.jpg" and hit["score"] == pytest.approx(1.0)
    local = run_json("query", photos / "rocket.jpg", "--index", index)["results"][0]["matches"][0]
    assert local["path"] == "s3://photos/lib/rocket.jpg"
    groups = run_json("dedup", "--index", index)["groups"]
    assert [sorted(g["files"]) for g in groups] == [["s3://photos/lib/chelsea.jpg",
                                                     "s3://photos/lib/copies/chelsea-copy.jpg"]]  # fmt: skip

    from fastapi.testclient import TestClient

    from simsearch.serve.app import create_app

    c = TestClient(create_app(index, warm_up=False), base_url="http://127.0.0.1")
    rid = next(m["id"] for m in c.get("/api/search", params={"id": 1, "k": 20}).json()["matches"]
               if m["path"].endswith("/rocket.jpg"))  # fmt: skip
    thumb = c.get(f"/api/images/{rid}/thumbnail", params={"size": 64})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"  # fetched through the index
    assert c.get(f"/api/images/{rid}").headers["content-type"] == "image/jpeg"
    client.upload_file(str(photos / "immunohistochemistry.jpg"), "photos", "lib/rocket.jpg")  # changed since
    assert c.get(f"/api/images/{rid}/thumbnail", params={"size": 64}).status_code == 409

    r = runner.invoke(app, ["dedup", "--index", str(index), "--action", "delete", "--yes"])
    assert r.exit_code == 1 and "object storage" in r.stderr  # report only: nothing in the bucket is touched

    # -3 objects, +2 objects, one overwritten: the sync sees exactly that
    for name in ("astronaut.jpg", "camera.jpg", "copies/chelsea-copy.jpg"):
        client.delete_object(Bucket="photos", Key=f"lib/{name}")
    client.upload_file(str(photos / "astronaut.jpg"), "photos", "lib/new/astronaut-again.jpg")
    client.upload_file(str(photos / "retina.jpg"), "photos", "lib/new/retina-2.jpg")
    client.upload_file(str(photos / "hubble_deep_field.jpg"), "photos", "lib/coffee.jpg")
    again = run_json("index", "s3://photos/lib", "--index", index)
    assert (again["removed"], again["updated"]) == (2, 2) and again["moved"] == 1, again  # astronaut moved to new/
    assert again["added"] == 1 and again["embedded"] == 0  # every content is indexed already: vectors reused
    assert run_json("info", "--index", index)["counts"]["images"] == 8
    assert run_json("index", "s3://photos/lib", "--index", index)["unchanged"] == 8


def test_bad_urls_are_one_line_errors(s3, tmp_path: Path) -> None:
    r = runner.invoke(app, ["index", "s3://no-such-bucket/x", "--index", str(tmp_path / "i")])
    assert r.exit_code == 1 and "no such bucket" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["index", "s3://", "--index", str(tmp_path / "i")])
    assert r.exit_code == 1 and "give a bucket" in r.stderr


def test_ray_workers_read_the_bucket_themselves_and_match_local(s3, photos: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")

    from simsearch.index.store import IndexStore

    for p in sorted(photos.glob("*.jpg"))[:5]:
        s3.upload_file(str(p), "photos", f"ray/{p.name}")
    local = run_json("index", "s3://photos/ray", "--index", tmp_path / "local")
    on_ray = run_json("index", "s3://photos/ray", "--index", tmp_path / "ray", "--ray", "local")
    assert local["added"] == on_ray["added"] == 5 and on_ray["ray"]["shards"] >= 1
    with IndexStore.open(tmp_path / "local") as a, IndexStore.open(tmp_path / "ray") as b:
        ra, rb = ({r.path: r.id for r in s.all_rows()} for s in (a, b))
        assert set(ra) == set(rb)
        va, vb = a.vectors([ra[p] for p in sorted(ra)]), b.vectors([rb[p] for p in sorted(ra)])
    assert float((va * vb).sum(axis=1).min()) > 0.9999


def test_sync_sees_ten_objects_removed_and_five_added_exactly(s3, photos: Path, tmp_path: Path) -> None:
    from PIL import Image

    from .test_resume import noise_images

    local = tmp_path / "pics"
    local.mkdir()
    noise_images(local, 21, 7, ".jpg")
    pics = sorted(local.iterdir())
    for p in pics[:16]:
        s3.upload_file(str(p), "photos", f"sync/{p.name}")
    index = tmp_path / "idx"
    assert run_json("index", "s3://photos/sync", "--index", index)["added"] == 16
    for p in pics[:10]:
        s3.delete_object(Bucket="photos", Key=f"sync/{p.name}")
    for p in pics[16:]:
        s3.upload_file(str(p), "photos", f"sync/more/{p.name}")
    rep = run_json("index", "s3://photos/sync", "--index", index)
    assert (rep["removed"], rep["added"], rep["unchanged"], rep["embedded"]) == (10, 5, 6, 5)
    assert Image.open(pics[0]).size == (160, 120)  # the pictures themselves were not touched
    from simsearch import SimIndex

    with SimIndex.open(index) as idx:
        assert sorted(r.path for r in idx.store.all_rows()) == sorted(
            [f"s3://photos/sync/{p.name}" for p in pics[10:16]] + [f"s3://photos/sync/more/{p.name}" for p in pics[16:]]
        )


def test_near_copies_in_a_bucket_are_checked_from_their_bytes(s3, photos: Path, tmp_path: Path) -> None:
    from .conftest import edited

    for name in ("coffee.jpg", "rocket.jpg", "camera.jpg"):
        s3.upload_file(str(photos / name), "photos", f"near/{name}")
    small = edited(photos / "coffee.jpg", tmp_path / "coffee-small.jpg", scale=0.7, quality=60)
    s3.upload_file(str(small), "photos", "near/copies/coffee-small.jpg")
    index = tmp_path / "idx"
    run_json("index", "s3://photos/near", "--index", index)
    out = run_json("dedup", "--index", index)
    assert [(g["kind"], sorted(g["files"])) for g in out["groups"]] == [
        ("near", ["s3://photos/near/coffee.jpg", "s3://photos/near/copies/coffee-small.jpg"])
    ]
    explained = run_json("dedup", "--index", index, "--explain", "s3://photos/near/coffee.jpg",
                         "s3://photos/near/copies/coffee-small.jpg")  # fmt: skip
    assert explained["tier"] == "copy"
