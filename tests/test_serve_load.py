"""A bounded loopback load test: 8 concurrent keep-alive clients, 400 requests of every read kind, zero errors."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from .conftest import edited
from .serve_util import build_index, build_library, live_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from simsearch.index.store import IndexStore  # noqa: E402
from simsearch.serve.app import create_app  # noqa: E402

CLIENTS, REQUESTS = 8, 400


def test_eight_concurrent_clients_400_requests_no_errors(photos: Path, tmp_path: Path) -> None:
    folder = build_library(photos, tmp_path / "lib")
    index = build_index(folder, tmp_path / "idx")
    with IndexStore.open(index) as s:
        ids = [r.id for r in s.all_rows()]
    uploads = [edited(photos / n, tmp_path / f"q-{n}", scale=0.7, quality=70).read_bytes()
               for n in ("rocket.jpg", "coffee.jpg")]  # fmt: skip

    with live_server(create_app(index)) as base:

        def client_run(c: int) -> list[str]:
            problems = []
            with httpx.Client(base_url=base, timeout=60) as http:
                for i in range(REQUESTS // CLIENTS):
                    rid = ids[(c * 7 + i) % len(ids)]
                    kind = i % 4
                    if kind == 0:
                        r = http.post("/api/search?k=5", files={"image": ("q.jpg", uploads[(c + i) % 2])})
                        ok = r.status_code == 200 and len(r.json()["matches"]) == 5
                    elif kind == 1:
                        r = http.get("/api/search", params={"id": rid, "k": 5})
                        ok = r.status_code == 200 and r.json()["matches"][0]["id"] == rid
                    elif kind == 2:
                        r = http.get(f"/api/images/{rid}/thumbnail", params={"size": 64 + 32 * (i % 3)})
                        ok = r.status_code == 200 and Image.open(io.BytesIO(r.content)).format == "JPEG"
                    else:
                        r = http.get("/api/duplicates", params={"group": "star"})
                        ok = r.status_code == 200 and r.json()["total_groups"] == 2
                    if not ok:
                        problems.append(f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:200]}")
            return problems

        with ThreadPoolExecutor(CLIENTS) as pool:
            problems = [p for ps in pool.map(client_run, range(CLIENTS)) for p in ps]
        assert problems == []
        assert httpx.get(f"{base}/api/info").status_code == 200
