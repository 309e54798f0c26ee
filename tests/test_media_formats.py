"""Camera RAW, HEIC and AVIF in the default install: read upright, indexed, grouped with their JPEG twins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.errors import ImageLoadError
from simsearch.images import load_encoded, open_image, sniff_format
from simsearch.media.raw import sniff_raw

from .media_util import write_dng

runner = CliRunner()


def halves(w: int = 300, h: int = 200) -> np.ndarray:
    """Red top half, blue bottom half: orientation mistakes show."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = (200, 30, 30)
    a[h // 2 :] = (30, 30, 200)
    return a


def exif_orientation(n: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = n
    return exif


def test_dng_mosaic_is_developed_upright_and_its_preview_used_when_large_enough(tmp_path: Path) -> None:
    p = write_dng(halves(), tmp_path / "shot.dng", orientation=6)
    assert sniff_format(p) == "RAW"
    im = np.asarray(open_image(p))
    assert im.shape == (150, 100, 3)  # half-size demosaic, turned 90 degrees clockwise: portrait
    assert im[5, 5, 2] > 150 > im[5, 5, 0] and im[5, -5, 0] > 150 > im[5, -5, 2]  # blue left, red right
    preview = np.zeros((200, 300, 3), np.uint8)
    preview[:, :150] = (220, 220, 0)
    p = write_dng(halves(), tmp_path / "with-preview.dng", orientation=6, preview=preview)
    small = np.asarray(open_image(p, target=100))
    assert small.shape == (300, 200, 3) and tuple(small[5, 5]) == (220, 220, 0) and small[-5, 5].sum() == 0
    big = np.asarray(open_image(p, target=400))  # the preview is smaller than asked: develop the mosaic
    assert big.shape == (150, 100, 3) and big[5, 5, 2] > 150
    _, stored = load_encoded(p.read_bytes(), 64, name=str(p))
    assert stored == (200, 300)


def test_raw_signatures_and_tiff_based_raw_by_name() -> None:
    tiff = b"II*\x00\x08\x00\x00\x00" + bytes(56)
    assert not sniff_raw(tiff) and not sniff_raw(tiff, "scan.tif") and sniff_raw(tiff, "IMG_0001.NEF")
    assert sniff_raw(b"II*\x00\x10\x00\x00\x00CR\x02\x00" + bytes(52))  # Canon CR2
    assert sniff_raw(b"\x00\x00\x00\x18ftypcrx " + bytes(52))  # Canon CR3
    assert sniff_raw(b"FUJIFILMCCD-RAW 0201" + bytes(44)) and sniff_raw(b"IIRO\x08\x00" + bytes(58))
    assert not sniff_raw(b"\xff\xd8\xff\xe0" + bytes(60), "x.dng")


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_truncated_or_corrupt_raw_is_one_line_error(tmp_path: Path, cut: float) -> None:
    good = write_dng(halves(), tmp_path / "good.dng").read_bytes()
    bad = tmp_path / "bad.dng"
    bad.write_bytes(good[: int(len(good) * cut)])
    with pytest.raises(ImageLoadError) as e:
        open_image(bad)
    assert "RAW" in str(e.value) and "\n" not in str(e.value) and str(bad) in str(e.value)


def test_heic_and_avif_read_upright_in_the_default_install(tmp_path: Path) -> None:
    """AVIF: Pillow turns the file's irot/imir boxes into the EXIF orientation, which is applied. HEIC: libheif applies
    the boxes itself and pillow-heif resets the EXIF tag, which the HEIF standard makes informational: a file with
    an EXIF orientation but no boxes (as written here) is shown as stored, never turned twice."""
    pytest.importorskip("pillow_heif")
    for ext, shape in (("avif", (300, 200, 3)), ("heic", (200, 300, 3))):
        p = tmp_path / f"turned.{ext}"
        if ext == "heic":
            import pillow_heif

            pillow_heif.register_heif_opener()
        Image.fromarray(halves()).save(p, quality=90, exif=exif_orientation(6))
        assert sniff_format(p) == ("HEIF" if ext == "heic" else "AVIF")
        im = np.asarray(open_image(p))
        assert im.shape == shape
        if ext == "avif":
            assert im[5, 5, 2] > 150 > im[5, 5, 0] and im[5, -5, 0] > 150 > im[5, -5, 2]


def test_raw_heic_avif_twins_are_indexed_and_grouped_with_their_jpegs(photos: Path, tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    folder = tmp_path / "library"
    shutil.copytree(photos, folder)
    twins = {"chelsea": "dng", "coffee": "heic", "rocket": "avif", "astronaut": "dng"}
    for name, ext in twins.items():
        rgb = np.asarray(Image.open(photos / f"{name}.jpg").convert("RGB"))
        if ext == "dng":
            write_dng(rgb, folder / f"{name}.dng")
        else:
            Image.fromarray(rgb).save(folder / f"{name}.{ext}", quality=80)
    (folder / "broken.dng").write_bytes((folder / "chelsea.dng").read_bytes()[:5000])
    index = tmp_path / "idx"
    r = runner.invoke(app, ["index", str(folder), "--index", str(index), "--json"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["added"] == 8 + len(twins)
    assert [Path(s["path"]).name for s in rep["skipped"]] == ["broken.dng"]
    out = runner.invoke(app, ["dedup", "--index", str(index), "--json"])
    groups = [sorted(Path(f).name for f in g["files"]) for g in json.loads(out.stdout)["groups"]]
    for name, ext in twins.items():
        assert sorted([f"{name}.jpg", f"{name}.{ext}"]) in groups, groups


def test_keep_rules_prefer_raw_or_jpeg(tmp_path: Path) -> None:
    from simsearch.dedup.finder import keep_key, parse_keep
    from simsearch.index.store import Row

    raw = Row(1, "/p/IMG_1.NEF", 25_000_000, 2, "a", 6000, 4000)
    jpeg = Row(2, "/p/IMG_1.JPG", 8_000_000, 1, "b", 6000, 4000)
    best = lambda spec: min([raw, jpeg], key=lambda r: keep_key(r, parse_keep(spec))).path  # noqa: E731
    assert best("prefer-raw,resolution") == raw.path and best("prefer-jpeg,resolution") == jpeg.path
    assert best(None) == raw.path  # the default keeps the larger file of two at one resolution
