"""The CLI contract: command names, JSON shapes, exit codes and one-line errors (CliRunner and real processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simsearch.cli import app

from .conftest import edited

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def run_json(*args: str) -> dict:
    code, out, err = run(*args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def library(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photos plus an exact copy and a resized re-encoded copy of one of them, in a subfolder."""
    d = tmp_path_factory.mktemp("library")
    shutil.copytree(photos, d / "photos")
    (d / "photos" / "copies").mkdir()
    shutil.copy(photos / "chelsea.jpg", d / "photos" / "copies" / "chelsea-copy.jpg")
    edited(photos / "coffee.jpg", d / "photos" / "copies" / "coffee-small.jpg", scale=0.8, quality=60)
    (d / "photos" / "notes.txt").write_text("not an image")
    (d / "photos" / "broken.jpg").write_bytes((photos / "rocket.jpg").read_bytes()[:3000])
    return d / "photos"


@pytest.fixture(scope="module")
def built(library: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    index = tmp_path_factory.mktemp("idx") / "lib"
    return index, run_json("index", library, "--index", index)


def test_index_json_contract(built: tuple[Path, dict], library: Path) -> None:
    index, out = built
    assert {"index", "indexed", "skipped", "total", "seconds"} <= out.keys()
    assert out["index"] == str(index)
    assert out["total"] == 11  # 8 photos + 2 copies + the truncated JPEG; notes.txt is not an image
    assert out["indexed"] == 10
    assert [s["path"] for s in out["skipped"]] == [str(library / "broken.jpg")]
    assert "truncated" in out["skipped"][0]["error"].lower()
    assert isinstance(out["seconds"], float)


def test_query_finds_itself_first(built: tuple[Path, dict], library: Path) -> None:
    index, _ = built
    out = run_json("query", library / "astronaut.jpg", "--index", index, "-k", "3")
    (res,) = out["results"]
    assert res["query"] == str(library / "astronaut.jpg")
    assert len(res["matches"]) == 3
    assert res["matches"][0] == {"path": str(library / "astronaut.jpg"), "score": 1.0}
    assert res["matches"][1]["score"] < 0.9


def test_query_exact_copy_ranks_itself_first(built: tuple[Path, dict], library: Path) -> None:
    index, _ = built
    copy = library / "copies" / "chelsea-copy.jpg"
    out = run_json("query", copy, library / "chelsea.jpg", "--index", index, "-k", "2")
    first, second = out["results"]
    assert [m["path"] for m in first["matches"]] == [str(copy), str(library / "chelsea.jpg")]
    assert [m["path"] for m in second["matches"]] == [str(library / "chelsea.jpg"), str(copy)]
    assert first["matches"][1]["score"] == pytest.approx(1.0, abs=1e-6)


def test_query_outside_image_ranks_its_original_first(built: tuple[Path, dict], photos: Path, tmp_path: Path) -> None:
    index, _ = built
    q = edited(photos / "rocket.jpg", tmp_path / "q.jpg", scale=0.5, quality=40)
    out = run_json("query", q, "--index", index, "-k", "4", "--min-score", "0.0")
    matches = out["results"][0]["matches"]
    assert matches[0]["path"].endswith("/rocket.jpg")
    assert matches[0]["score"] > matches[1]["score"] + 0.2


def test_query_plain_output_is_a_table(built: tuple[Path, dict], library: Path) -> None:
    index, _ = built
    code, out, _ = run("query", library / "coffee.jpg", "--index", index, "-k", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"query: {library / 'coffee.jpg'}"
    assert lines[1].split() == ["1", "1.0000", str(library / "coffee.jpg")]


def test_min_score_filters(built: tuple[Path, dict], library: Path) -> None:
    index, _ = built
    out = run_json("query", library / "coffee.jpg", "--index", index, "--min-score", "0.8")
    paths = [m["path"] for m in out["results"][0]["matches"]]
    assert paths == [str(library / "coffee.jpg"), str(library / "copies" / "coffee-small.jpg")]


def test_dedup_finds_exact_and_near(built: tuple[Path, dict], library: Path) -> None:
    index, _ = built
    out = run_json("dedup", "--index", index)
    assert {"threshold", "groups", "duplicates"} <= out.keys()
    kinds = {g["kind"]: g for g in out["groups"]}
    assert set(kinds) == {"exact", "near"}
    assert sorted(kinds["exact"]["files"]) == sorted(
        [str(library / "chelsea.jpg"), str(library / "copies" / "chelsea-copy.jpg")]
    )
    assert sorted(kinds["near"]["files"]) == sorted(
        [str(library / "coffee.jpg"), str(library / "copies" / "coffee-small.jpg")]
    )
    assert kinds["near"]["files"][0] == str(library / "coffee.jpg")  # larger resolution is kept
    assert kinds["exact"]["min_score"] == 1.0
    assert out["threshold"] <= kinds["near"]["min_score"] < 1.0
    assert out["duplicates"] == 2


def test_dedup_explain(built: tuple[Path, dict], library: Path) -> None:
    index, _ = built
    out = run_json("dedup", "--index", index, "--explain", library / "coffee.jpg", library / "chelsea.jpg")
    assert out["grouped"] is False and out["score"] < out["threshold"]


def test_info_and_backbones(built: tuple[Path, dict]) -> None:
    index, _ = built
    info = run_json("info", "--index", index)
    assert info["backbone"] == "efficientnet-lite0" and info["dim"] == 1280
    assert info["counts"] == {"images": 10, "failed": 1}
    bb = run_json("backbones")
    names = {b["name"]: b for b in bb["backbones"]}
    assert names["efficientnet-lite0"]["offline"] is True
    assert {"vgg16", "resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny"} <= names.keys()
    assert names["inception_v3"]["input_size"] == 299


def test_errors_are_one_line_with_exit_codes(built: tuple[Path, dict], tmp_path: Path, library: Path) -> None:
    index, _ = built
    cases = [
        (("index", tmp_path / "missing"), 1, "folder not found"),
        (("query", library / "astronaut.jpg", "--index", tmp_path / "nope"), 2, "no index"),
        (("info", "--index", library), 2, "not a simsearch index"),
        (("query", tmp_path / "missing.jpg", "--index", index), 1, "not found"),
        (("query", library / "notes.txt", "--index", index), 1, "not an image"),
        (("index", library, "--index", index, "--backbone", "mobilenet_v2"), 2, "--rebuild"),
        (("index", library, "--index", index, "--backbone", "nosuchnet"), 1, "unknown backbone"),
        (("query", library / "coffee.jpg", "--index", index, "-k", "0"), 1, ""),
    ]
    for args, code, text in cases:
        got, out, err = run(*args)
        assert got == code, (args, got, out, err)
        assert text in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err


@pytest.mark.parametrize("index_type", ["auto", "IVF2,SQ8", "hnsw"])
def test_resync_is_a_no_op_then_tracks_changes(library: Path, tmp_path: Path, index_type: str) -> None:
    folder = tmp_path / "f"
    shutil.copytree(library, folder)
    index = tmp_path / "idx"
    first = run_json("index", folder, "--index", index, "--index-type", index_type)
    kind = json.loads((index / "manifest.json").read_text())["search"]["kind"]
    assert kind == {"auto": "flat", "IVF2,SQ8": "factory", "hnsw": "hnsw"}[index_type]
    again = run_json("index", folder, "--index", index)
    assert again["unchanged"] == first["indexed"] and again["indexed"] == 0 and again["embedded"] == 0
    (folder / "copies" / "coffee-small.jpg").rename(folder / "moved.jpg")
    (folder / "astronaut.jpg").unlink()
    shutil.copy(folder / "rocket.jpg", folder / "rocket2.jpg")
    third = run_json("index", folder, "--index", index)
    assert (third["moved"], third["removed"], third["added"], third["embedded"]) == (1, 1, 1, 0)
    q = run_json("query", folder / "moved.jpg", "--index", index, "-k", "1")
    assert q["results"][0]["matches"][0] == {"path": str(folder / "moved.jpg"), "score": 1.0}
    edited(folder / "rocket.jpg", folder / "rocket2.jpg", scale=0.5, quality=40)  # changed content: re-embedded
    fourth = run_json("index", folder, "--index", index)
    assert (fourth["updated"], fourth["embedded"]) == (1, 1)
    for name in ("rocket2.jpg", "moved.jpg", "chelsea.jpg"):
        q = run_json("query", folder / name, "--index", index, "-k", "3")
        paths = [m["path"] for m in q["results"][0]["matches"]]
        assert paths[0] == str(folder / name) and str(folder / "astronaut.jpg") not in paths


def test_installed_console_script(built: tuple[Path, dict], library: Path) -> None:
    exe = shutil.which("simsearch") or str(Path(sys.executable).parent / "simsearch")
    if not os.path.exists(exe):
        pytest.skip("simsearch console script not installed")
    index, _ = built
    r = subprocess.run([exe, "query", str(library / "rocket.jpg"), "--index", str(index), "--json", "-k", "1"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["matches"][0]["score"] == 1.0
    r = subprocess.run([exe, "info", "--index", str(index.parent / "nothing")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("simsearch: error:") and "Traceback" not in r.stderr
    r = subprocess.run([exe, "query", "--bogus-option"], capture_output=True, text=True)
    assert r.returncode == 1


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_dedup_html_and_csv_render_in_a_real_browser(built: tuple[Path, dict], library: Path, tmp_path: Path) -> None:
    import csv

    from PIL import Image

    index, _ = built
    html_file, csv_file = tmp_path / "report.html", tmp_path / "report.csv"
    code, out, err = run("dedup", "--index", index, "--html", html_file, "--csv", csv_file)
    assert code == 0, err
    rows = list(csv.DictReader(csv_file.open()))
    assert len(rows) == 4 and {r["kind"] for r in rows} == {"exact", "near"}
    assert sorted(r["keep"] for r in rows) == ["0", "0", "1", "1"]
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", html_file.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-groups-rendered="2"' in dom.stdout, dom.stderr[-2000:]
    assert 'data-images-loaded="4"' in dom.stdout  # every thumbnail decoded by the browser
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1000,800", html_file.as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    green = (abs(img[..., 0] - 0x22) < 20) & (abs(img[..., 1] - 0xAA) < 20) & (abs(img[..., 2] - 0x22) < 20)
    assert green.sum() > 500  # the kept files' outlines are drawn
    assert img.std() > 20  # thumbnails, not a blank page
