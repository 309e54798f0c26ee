"""Helpers shared by the serve tests: a small library with duplicates, its index, and a live loopback server."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app as cli_app

from .conftest import edited


def build_library(photos: Path, dst: Path) -> Path:
    """photos + an exact copy of chelsea + a resized coffee + a landscape JPEG stored with EXIF orientation 6."""
    shutil.copytree(photos, dst)
    (dst / "copies").mkdir()
    shutil.copy(photos / "chelsea.jpg", dst / "copies" / "chelsea-copy.jpg")
    edited(photos / "coffee.jpg", dst / "copies" / "coffee-small.jpg", scale=0.8, quality=60)
    wide = Image.new("RGB", (300, 200), (220, 30, 30))
    wide.paste((30, 30, 220), (150, 0, 300, 200))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: 200 wide, 300 high, red on top
    wide.save(dst / "rotated.jpg", quality=90, exif=exif)
    return dst


def build_index(folder: Path, index: Path) -> Path:
    r = CliRunner().invoke(cli_app, ["index", str(folder), "--index", str(index), "--json"])
    assert r.exit_code == 0, r.stderr
    return index


@contextmanager
def live_server(app: object) -> Iterator[str]:
    """Run `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
