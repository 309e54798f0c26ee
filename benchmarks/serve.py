"""`simsearch serve` latency and throughput over loopback, with bounded request counts.

python benchmarks/serve.py INDEX [--requests 200]

Starts the server in a subprocess on a free 127.0.0.1 port, then measures, with keep-alive HTTP clients:
p50/p99 latency of an uploaded-image query (a file of the index, sent as multipart) and of a by-id query, then
requests/s of each kind with 1, 4 and 8 concurrent clients. Prints a table and one JSON line. The client shares the
CPU with the server, so the figures are for the pair on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "simsearch.cli", "serve", "--index", str(index), "--port", str(port), "--read-only"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


def sample_ids(index: Path, n: int) -> list[int]:
    with sqlite3.connect(f"file:{index / 'meta.sqlite'}?mode=ro", uri=True) as db:
        ids = [r[0] for r in db.execute("SELECT id FROM images ORDER BY id")]
    return [ids[int(i)] for i in np.linspace(0, len(ids) - 1, n)]


def query_file(index: Path) -> tuple[str, bytes]:
    """The first indexed JPEG (on clothing: a 400x533 photo)."""
    with sqlite3.connect(f"file:{index / 'meta.sqlite'}?mode=ro", uri=True) as db:
        for (path,) in db.execute("SELECT path FROM images ORDER BY id"):
            if path.lower().endswith((".jpg", ".jpeg")) and os.path.isfile(path):
                return path, Path(path).read_bytes()
    raise SystemExit("no JPEG in the index")


class Worker:
    """One keep-alive client; counts non-200 answers and transport errors."""

    def __init__(self, base: str, data: bytes) -> None:
        self.client = httpx.Client(base_url=base, timeout=30)
        self.data = data
        self.errors = 0

    def upload(self, _: int) -> float:
        t = time.perf_counter()
        try:
            r = self.client.post("/api/search?k=10", files={"image": ("q.jpg", self.data, "image/jpeg")})
            self.errors += r.status_code != 200
        except httpx.HTTPError:
            self.errors += 1
        return time.perf_counter() - t

    def by_id(self, image_id: int) -> float:
        t = time.perf_counter()
        try:
            r = self.client.get("/api/search", params={"id": image_id, "k": 10})
            self.errors += r.status_code != 200
        except httpx.HTTPError:
            self.errors += 1
        return time.perf_counter() - t


def latency(worker: Worker, kind: str, args: list[int]) -> dict[str, float]:
    fn = worker.upload if kind == "upload" else worker.by_id
    for a in args[:10]:  # warm-up
        fn(a)
    ms = np.array([fn(a) for a in args]) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def throughput(base: str, data: bytes, kind: str, ids: list[int], clients: int) -> tuple[float, int]:
    workers = [Worker(base, data) for _ in range(clients)]
    share = [ids[i::clients] for i in range(clients)]

    def run(w: Worker, part: list[int]) -> None:
        fn = w.upload if kind == "upload" else w.by_id
        for a in part:
            fn(a)

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, workers, share))
    dt = time.perf_counter() - t
    return round(len(ids) / dt, 1), sum(w.errors for w in workers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("index", type=Path)
    ap.add_argument("--requests", type=int, default=200, help="requests per measurement (bounded)")
    a = ap.parse_args()
    n = max(20, min(a.requests, 5000))
    port = free_port()
    proc = start_server(a.index.expanduser(), port)
    base = f"http://127.0.0.1:{port}"
    try:
        path, data = query_file(a.index)
        ids = sample_ids(a.index, n)
        w = Worker(base, data)
        result: dict = {"index": str(a.index), "requests": n, "query_file": path, "query_bytes": len(data),
                        "upload": latency(w, "upload", ids), "by_id": latency(w, "by_id", ids)}  # fmt: skip
        errors = w.errors
        for kind in ("upload", "by_id"):
            for c in (1, 4, 8):
                rps, err = throughput(base, data, kind, ids, c)
                result[kind][f"rps_{c}"] = rps
                errors += err
        result["errors"] = errors
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"{'query':<8}{'p50 ms':>9}{'p99 ms':>9}{'req/s x1':>10}{'req/s x4':>10}{'req/s x8':>10}")
    for kind in ("upload", "by_id"):
        r = result[kind]
        print(f"{kind:<8}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['rps_1']:>10}{r['rps_4']:>10}{r['rps_8']:>10}")
    print(f"errors: {result['errors']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
