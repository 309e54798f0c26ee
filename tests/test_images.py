"""Tests for simsearch.images: content sniffing, discovery, robust decoding, modes, EXIF, draft, fits."""

from __future__ import annotations

import io
import os
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch import images as si
from simsearch.images import (
    FITS,
    ImageLoadError,
    find_images,
    load_encoded,
    load_image,
    open_image,
    scan_images,
    sniff_bytes,
    sniff_format,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clothing" / "images"


def _pattern(w: int = 64, h: int = 48) -> Image.Image:
    """An asymmetric, smooth RGB test picture (orientation and crops are detectable)."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), ((x + 2 * y) * 3) % 256], axis=-1)
    a[: h // 4, : w // 4] = (255, 0, 0)
    return Image.fromarray(a.astype(np.uint8), "RGB")


def _save(im: Image.Image, path: Path, fmt: str, **kw) -> Path:
    im.save(path, format=fmt, **kw)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ----------------------------------------------------------------------------------------------- bad files


def _assert_error(path: Path, needle: str) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path, 32)
    err = info.value
    assert err.path == str(path)
    assert str(path) in str(err)
    assert needle in str(err)
    assert "\n" not in str(err)
    return err


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    _assert_error(p, "empty file (0 bytes)")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    _pattern(300, 200).save(buf, format=fmt)
    data = buf.getvalue()
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    _assert_error(p, "truncated image")


def test_corrupt_jpeg_body_is_an_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _pattern(300, 200).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[100:400] = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()  # 1% of seeds decode
    p = tmp_path / "garbled.png"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError, match="garbled.png"):
        load_image(p, 32)


@pytest.mark.parametrize(
    "content", [b"hello, I am text, not a picture\n" * 10, bytes(range(256)) * 4], ids=["text", "random"]
)
def test_not_an_image(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "fake.jpg"
    p.write_bytes(content)
    _assert_error(p, "not an image (unknown format)")


def test_sniffed_format_that_pillow_rejects(tmp_path: Path) -> None:
    p = tmp_path / "liar.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageLoadError, match="liar.png"):
        open_image(p)


def test_bomb_header_rejected_without_decoding(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(30_000, 30_000))
    err = _assert_error(p, "image too large")
    assert err.reason.startswith("image too large")


def test_pixel_limit_is_enforced_and_pillow_warning_does_not_leak(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "big.png"
    p.write_bytes(_png_header_only(12_000, 10_000))  # 120 MP: above Pillow's warning threshold
    monkeypatch.setattr(si, "MAX_PIXELS", 100_000_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = _assert_error(p, "image too large (120000000 pixels > 100000000 limit)")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert err.path == str(p)


def test_monkeypatched_low_limit(tmp_path: Path, monkeypatch) -> None:
    p = _save(_pattern(100, 100), tmp_path / "ok.png", "PNG")
    assert load_image(p, 16).shape == (16, 16, 3)
    monkeypatch.setattr(si, "MAX_PIXELS", 5_000)
    _assert_error(p, "image too large (10000 pixels > 5000 limit)")
    with pytest.raises(ImageLoadError, match="too large"):
        open_image(p.read_bytes())
    assert open_image(p, max_pixels=20_000).size == (100, 100)


def test_pillow_bomb_error_is_converted(tmp_path: Path, monkeypatch) -> None:
    p = _save(_pattern(100, 100), tmp_path / "ok.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    _assert_error(p, "image too large")


def test_directory_and_missing_file(tmp_path: Path) -> None:
    d = tmp_path / "folder.jpg"
    d.mkdir()
    _assert_error(d, "directory")
    _assert_error(tmp_path / "nope.jpg", "file not found")


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root can read anything")
def test_permission_denied(tmp_path: Path) -> None:
    p = _save(_pattern(), tmp_path / "locked.png", "PNG")
    p.chmod(0)
    try:
        _assert_error(p, "cannot read: permission denied")
    finally:
        p.chmod(0o644)


def test_permission_denied_simulated(tmp_path: Path, monkeypatch) -> None:
    p = _save(_pattern(), tmp_path / "locked.png", "PNG")

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))

    monkeypatch.setattr(si.os, "open", deny)  # images are opened with os.open (O_NONBLOCK, after a stat)
    _assert_error(p, "cannot read: permission denied")
    images, skipped = scan_images(tmp_path)
    assert images == [] and skipped == [(p, "cannot read: permission denied")]


def test_error_for_bytes_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not an image") as info:
        open_image(b"definitely not an image at all")
    assert info.value.path is None and str(info.value) == "not an image (unknown format)"
    with pytest.raises(ImageLoadError, match="empty"):
        open_image(b"")
    p = _save(_pattern(), tmp_path / "a.png", "PNG")
    with pytest.raises(ValueError):
        load_image(p, 32, fit="stretch")
    with pytest.raises(ValueError):
        load_image(p, 0)
    with pytest.raises(TypeError):
        open_image(12345)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ sniffing


def test_sniff_real_files(tmp_path: Path) -> None:
    im = _pattern()
    cases = {"JPEG": "JPEG", "PNG": "PNG", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF", "WEBP": "WEBP"}
    cases.update({"ICO": "ICO", "PPM": "PPM"})
    for fmt, expected in cases.items():
        p = _save(im, tmp_path / f"x_{fmt}.bin", fmt)
        assert sniff_format(p) == expected, fmt
    big_endian = tmp_path / "mm.tif"
    im.save(big_endian, format="TIFF")
    raw = bytearray(big_endian.read_bytes())
    assert raw[:2] == b"II"
    assert sniff_bytes(b"MM\x00*\x00\x00\x00\x08") == "TIFF"


def test_sniff_iso_bmff_brands() -> None:
    def ftyp(major: bytes, *compat: bytes) -> bytes:
        body = major + b"\x00\x00\x00\x00" + b"".join(compat)
        return struct.pack(">I", 8 + len(body)) + b"ftyp" + body

    assert sniff_bytes(ftyp(b"heic", b"mif1", b"heic")) == "HEIF"
    assert sniff_bytes(ftyp(b"mif1", b"mif1", b"heic")) == "HEIF"
    assert sniff_bytes(ftyp(b"avif", b"mif1", b"avif")) == "AVIF"
    assert sniff_bytes(ftyp(b"mif1", b"mif1", b"avif", b"miaf")) == "AVIF"
    assert sniff_bytes(ftyp(b"isom", b"isom", b"mp41")) is None  # an MP4 video is not an image
    assert sniff_bytes(b"BM" + b"\x00" * 30) is None  # "BM" alone is not enough
    assert sniff_bytes(b"") is None


def test_sniff_ignores_extension(tmp_path: Path) -> None:
    p = _save(_pattern(), tmp_path / "photo.txt", "PNG")
    assert sniff_format(p) == "PNG"
    q = tmp_path / "photo.jpg"
    q.write_text("just text")
    assert sniff_format(q) is None


# ----------------------------------------------------------------------------------------------- discovery


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    (root / "index").mkdir()
    im = _pattern()
    _save(im, root / "z.jpg", "JPEG")
    _save(im, root / "png_named.txt", "PNG")
    (root / "text_named.jpg").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    _save(im, root / "a" / "1.gif", "GIF")
    _save(im, root / "b" / "deep" / "2.webp", "WEBP")
    _save(im, root / "b" / "3.bmp", "BMP")
    _save(im, root / ".hidden" / "h.png", "PNG")
    _save(im, root / ".dotfile.png", "PNG")
    _save(im, root / "index" / "thumb.png", "PNG")
    return root


def test_find_images_content_recursion_order_exclude(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    found = list(find_images(root, exclude=[root / "index"]))
    rel = [p.relative_to(root).as_posix() for p in found]
    assert rel == ["a/1.gif", "b/3.bmp", "b/deep/2.webp", "png_named.txt", "z.jpg"]
    assert all(p.is_absolute() for p in found)
    assert found == sorted(found, key=lambda p: p.parts)
    with_index = [p.relative_to(root).as_posix() for p in find_images(root)]
    assert "index/thumb.png" in with_index
    hidden = [p.relative_to(root).as_posix() for p in find_images(root, include_hidden=True)]
    assert ".hidden/h.png" in hidden and ".dotfile.png" in hidden


def test_find_images_relative_root_gives_absolute_paths(tmp_path: Path, monkeypatch) -> None:
    root = _tree(tmp_path)
    monkeypatch.chdir(root.parent)
    found = list(find_images("photos"))
    assert found and all(p.is_absolute() for p in found)


def test_scan_images_reports_skips(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    images, skipped = scan_images(root, exclude=[root / "index"])
    assert len(images) == 5
    reasons = {p.name: r for p, r in skipped}
    assert reasons["text_named.jpg"] == "not an image (unknown format)"
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert "h.png" not in reasons  # hidden entries are neither found nor reported


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX symlinks")
def test_symlink_loop_terminates_and_linked_dirs_are_followed(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "b" / "loop").symlink_to(root, target_is_directory=True)
    (root / "b" / "deep" / "self").symlink_to(root / "b" / "deep", target_is_directory=True)
    (root / "broken").symlink_to(tmp_path / "does-not-exist")
    other = tmp_path / "elsewhere"
    other.mkdir()
    _save(_pattern(), other / "linked.png", "PNG")
    (root / "c_link").symlink_to(other, target_is_directory=True)
    found = [p.relative_to(root).as_posix() for p in find_images(root, exclude=[root / "index"])]
    assert found == ["a/1.gif", "b/3.bmp", "b/deep/2.webp", "c_link/linked.png", "png_named.txt", "z.jpg"]
    _, skipped = scan_images(root)
    assert (root / "broken", "broken symlink") in skipped


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_is_not_opened(tmp_path: Path) -> None:
    _save(_pattern(), tmp_path / "a.png", "PNG")
    os.mkfifo(tmp_path / "pipe.jpg")
    images, skipped = scan_images(tmp_path)
    assert [p.name for p in images] == ["a.png"]
    assert (tmp_path / "pipe.jpg", "not a regular file") in skipped


def _jpeg_with_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    _pattern(120, 90).save(buf, "JPEG", exif=exif, icc_profile=b"x" * 300)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "PPM", "GIF", "TIFF"])
def test_every_truncated_header_is_an_image_load_error(fmt: str) -> None:
    """Files cut anywhere in their first bytes (headers, EXIF, ICC) fail as ImageLoadError, never OSError/ValueError:
    header parsers raise those ("Truncated File Read"), which the server answered with 500."""
    if fmt == "JPEG":
        data = _jpeg_with_exif()
    else:
        buf = io.BytesIO()
        _pattern(120, 90).save(buf, fmt)
        data = buf.getvalue()
    for n in range(1, min(len(data) - 24, 600)):  # a PNG or GIF cut in its trailer (IEND, 0x3B) still decodes
        with pytest.raises(ImageLoadError) as info:
            load_encoded(data[:n], 32)
        assert "\n" not in str(info.value)


def test_header_only_and_cut_jpegs_and_pngs(tmp_path: Path) -> None:
    data = _jpeg_with_exif()
    sos = data.index(b"\xff\xda")
    cut_idat = _png_header_only(64, 64)[:-12] + _png_chunk(b"IDAT", zlib.compress(b"\0" * 999)[:20])
    cases = {"soi-app0.jpg": data[:20], "header-only.jpg": data[:sos], "cut-scan.jpg": data[: sos + 40],
             "cut-idat.png": cut_idat}  # fmt: skip
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ImageLoadError) as info:
            load_image(p, 32)
        assert str(p) in str(info.value) and type(info.value) is ImageLoadError


def test_too_large_and_unsupported_are_distinct_kinds(tmp_path: Path) -> None:
    bomb = io.BytesIO()
    Image.new("L", (300, 300)).save(bomb, "PNG")
    with pytest.raises(si.ImageTooLargeError):
        load_encoded(bomb.getvalue(), 32, max_pixels=1000)
    with pytest.raises(si.UnsupportedImageError, match="not an image"):
        load_encoded(b"plain text, no image", 32)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_given_as_an_image_fails_at_once(tmp_path: Path) -> None:
    """open_image and sniff_format stat before opening: a FIFO with no writer would block a plain open() forever."""
    import threading

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def attempt() -> None:
        for fn in (lambda: open_image(fifo), lambda: load_image(fifo, 32), lambda: sniff_format(fifo),
                   lambda: si.require_regular_file(fifo), lambda: si.decoded(fifo).__enter__()):  # fmt: skip
            try:
                fn()
            except (ImageLoadError, OSError) as e:
                errors.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout=10)
    if t.is_alive():  # unblock the hung open before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("opening a FIFO as an image blocked")
    assert len(errors) == 5 and all("FIFO" in str(e) for e in errors), errors
    with pytest.raises(ImageLoadError, match="is a device"):
        open_image("/dev/null")
    with pytest.raises(ImageLoadError, match="is a directory"):
        open_image(tmp_path)


def test_decoded_holds_the_budget_until_the_block_ends(tmp_path: Path) -> None:
    from simsearch.decode_budget import BUDGET, decode_cost

    p = _save(_pattern(400, 300), tmp_path / "a.png", "PNG")
    before = BUDGET.in_flight
    with si.decoded(p) as im:
        assert im.size == (400, 300)
        assert BUDGET.in_flight - before == decode_cost(400, 300, "RGB")
    assert BUDGET.in_flight == before
    with open(p, "rb") as f, si.decoded(f, target=64, name="upload") as im2:
        assert im2.size == (400, 300)
    with pytest.raises(ImageLoadError, match="upload"), si.decoded(io.BytesIO(b"\x89PNG\r\n\x1a\n"), name="upload"):
        pass
    assert BUDGET.in_flight == before


def test_find_images_single_file_and_missing_root(tmp_path: Path) -> None:
    p = _save(_pattern(), tmp_path / "one.png", "PNG")
    assert list(find_images(p)) == [p]
    t = tmp_path / "one.txt"
    t.write_text("x")
    assert list(find_images(t)) == []
    with pytest.raises(FileNotFoundError, match="missing"):
        list(find_images(tmp_path / "missing"))


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_directory_does_not_crash(tmp_path: Path) -> None:
    _save(_pattern(), tmp_path / "a.png", "PNG")
    locked = tmp_path / "locked"
    locked.mkdir()
    _save(_pattern(), locked / "b.png", "PNG")
    locked.chmod(0)
    try:
        images, skipped = scan_images(tmp_path)
    finally:
        locked.chmod(0o755)
    assert [p.name for p in images] == ["a.png"]
    assert (locked, "cannot read: permission denied") in skipped


def test_unreadable_directory_simulated(tmp_path: Path, monkeypatch) -> None:
    _save(_pattern(), tmp_path / "a.png", "PNG")
    locked = tmp_path / "locked"
    locked.mkdir()
    _save(_pattern(), locked / "b.png", "PNG")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(si.os, "scandir", scandir)
    images, skipped = scan_images(tmp_path)
    assert [p.name for p in images] == ["a.png"]
    assert skipped == [(locked, "cannot read: permission denied")]


# -------------------------------------------------------------------------------------------------- modes


def _check(arr: np.ndarray, size: int = 32) -> None:
    assert arr.shape == (size, size, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous


def test_palette_with_transparency_becomes_white(tmp_path: Path) -> None:
    im = Image.new("P", (40, 40), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(0, (0, 0, 20, 40))
    im.info["transparency"] = 0
    p = _save(im, tmp_path / "p.png", "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr = load_image(p, 40)
    _check(arr, 40)
    assert (arr[:, :20] == 255).all()
    assert (arr[:, 20:] == (255, 0, 0)).all()


@pytest.mark.parametrize(("mode", "key"), [("RGB", (1, 2, 3)), ("L", 1)])
def test_colour_key_transparency_becomes_white(tmp_path: Path, mode: str, key) -> None:
    im = Image.new(mode, (20, 20), key)
    im.paste((9, 9, 9) if mode == "RGB" else 9, (0, 0, 10, 20))
    p = _save(im, tmp_path / "key.png", "PNG", transparency=key)
    arr = load_image(p, 20)
    assert (arr[:, :10] == 9).all() and (arr[:, 10:] == 255).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_over_white(tmp_path: Path, mode: str) -> None:
    base = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    base.paste((0, 0, 0, 0), (0, 0, 16, 32))
    im = base.convert(mode)
    p = _save(im, tmp_path / f"{mode}.png", "PNG")
    arr = load_image(p, 32)
    _check(arr)
    assert (arr[:, :16] == 255).all()
    assert (arr[:, 16:] == 0).all()


def test_cmyk_jpeg(tmp_path: Path) -> None:
    im = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    p = _save(im, tmp_path / "cmyk.jpg", "JPEG", quality=95)
    arr = load_image(p, 32)
    _check(arr)
    mean = arr.reshape(-1, 3).mean(axis=0)
    assert mean[0] > 200 and mean[1] < 60 and mean[2] < 60


def test_16_bit_gradient_keeps_gradient(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    im = Image.fromarray(ramp)
    p = _save(im, tmp_path / "g16.png", "PNG")
    assert Image.open(p).mode.startswith("I")
    arr = load_image(p, 64, fit="pad")
    row = arr[32, :, 0].astype(int)
    assert row[0] < 10 and row[-1] > 245
    assert (np.diff(row) >= 0).all()
    assert len(np.unique(row)) > 30


def test_32_bit_and_float_tiffs(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(-1000, 100_000, 64), (64, 1))
    p = _save(Image.fromarray(ramp.astype(np.int32)), tmp_path / "i32.tif", "TIFF")
    row = load_image(p, 64)[10, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()
    q = _save(Image.fromarray((ramp / 100_000).clip(0, 1).astype(np.float32)), tmp_path / "f.tif", "TIFF")
    row = load_image(q, 64)[10, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()


def test_one_bit_and_grayscale(tmp_path: Path) -> None:
    im = Image.new("1", (32, 32), 0)
    im.paste(1, (0, 0, 16, 32))
    arr = load_image(_save(im, tmp_path / "bw.png", "PNG"), 32)
    _check(arr)
    assert (arr[:, :16] == 255).all() and (arr[:, 16:] == 0).all()
    gray = load_image(_save(_pattern().convert("L"), tmp_path / "l.jpg", "JPEG"), 32)
    _check(gray)
    assert (gray[..., 0] == gray[..., 1]).all()


# ---------------------------------------------------------------------------------------------------- EXIF


@pytest.mark.parametrize(
    ("orientation", "stored_as"), [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)]
)
def test_exif_orientation_applied(tmp_path: Path, orientation: int, stored_as: Image.Transpose) -> None:
    upright = _pattern(120, 80)
    up = _save(upright, tmp_path / "up.jpg", "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = orientation
    rot = _save(upright.transpose(stored_as), tmp_path / "rot.jpg", "JPEG", quality=95, exif=exif)
    assert Image.open(rot).size == (80, 120)
    assert open_image(rot).size == (120, 80)
    a, b = load_image(up, 64), load_image(rot, 64)
    assert _mad(a, b) < 3
    wrong = np.asarray(Image.open(rot).convert("RGB").resize((64, 64)))
    assert _mad(a, wrong) > 20  # the test image really is orientation-sensitive
    assert open_image(rot).getexif().get(0x0112) is None  # not rotated twice by later code


def test_broken_exif_does_not_make_image_unreadable(tmp_path: Path) -> None:
    p = _save(_pattern(), tmp_path / "x.jpg", "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    _check(load_image(p, 32))


# --------------------------------------------------------------------------------------------------- draft


def test_draft_is_faster_and_close(tmp_path: Path) -> None:
    big = _pattern(400, 300).resize((4000, 3000), Image.Resampling.BICUBIC)
    p = _save(big, tmp_path / "big.jpg", "JPEG", quality=90)
    drafted = open_image(p, target=224)
    assert min(drafted.size) >= 224 and drafted.size == (500, 375)

    def best(fn, n: int = 3) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    fast = best(lambda: load_image(p, 224))
    slow = best(lambda: np.asarray(open_image(p).resize((224, 224), Image.Resampling.BICUBIC)))
    assert fast < slow / 2
    a = load_image(p, 224)
    b = np.asarray(open_image(p).resize((224, 224), Image.Resampling.BICUBIC))
    assert _mad(a, b) < 2


def test_draft_stops_at_three_quarters_of_the_target(tmp_path: Path) -> None:
    web = _save(_pattern(400, 533), tmp_path / "web.jpg", "JPEG", quality=92)
    assert open_image(web, target=224).size == (200, 267)  # half scale (rounded up) covers 200/224 = 0.89 of the target
    assert open_image(web, target=280).size == (400, 533)  # 200/280 = 0.71 would lose too much
    small = _save(_pattern(300, 400), tmp_path / "small.jpg", "JPEG", quality=92)
    assert open_image(small, target=224).size == (300, 400)
    full = np.asarray(open_image(web).resize((224, 224), Image.Resampling.BILINEAR))
    assert _mad(load_image(web, 224), full) < 3


def test_draft_with_rotation_keeps_target_covered(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    big = _pattern(300, 200).resize((3000, 2000)).transpose(Image.Transpose.ROTATE_90)
    p = _save(big, tmp_path / "rot_big.jpg", "JPEG", exif=exif)
    im = open_image(p, target=224)
    assert im.size[0] > im.size[1] and min(im.size) >= 224
    ref = load_image(_save(_pattern(300, 200).resize((3000, 2000)), tmp_path / "u.jpg", "JPEG"), 224)
    assert _mad(load_image(p, 224, fit="crop"), load_image(tmp_path / "u.jpg", 224, fit="crop")) < 3
    assert ref.shape == (224, 224, 3)


# ------------------------------------------------------------------------------------------ formats & fits


def test_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(p).n_frames == 3
    arr = load_image(p, 16)
    assert (np.abs(arr.astype(int) - (255, 0, 0)) < 8).all()


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "PNG", "PPM", "ICO"])
def test_other_formats_load(tmp_path: Path, fmt: str) -> None:
    im = _pattern(64, 64)
    p = _save(im, tmp_path / f"x.{fmt.lower()}", fmt, **({"quality": 95} if fmt == "WEBP" else {}))
    arr = np.asarray(open_image(p))
    assert arr.shape == (64, 64, 3)
    if fmt == "WEBP":  # lossy
        assert _mad(arr, np.asarray(im)) < 6
    else:
        assert np.array_equal(arr, np.asarray(im))


def test_avif_loads_when_supported(tmp_path: Path) -> None:
    Image.init()
    if "AVIF" not in Image.SAVE:
        pytest.skip("this Pillow cannot write AVIF")
    p = _save(_pattern(64, 64), tmp_path / "x.avif", "AVIF", quality=90)
    assert sniff_format(p) == "AVIF"
    assert _mad(load_image(p, 64), np.asarray(_pattern(64, 64))) < 10


def test_fits(tmp_path: Path) -> None:
    im = Image.new("RGB", (300, 100), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 50, 100))
    im.paste((0, 255, 0), (250, 0, 300, 100))
    p = _save(im, tmp_path / "wide.png", "PNG")
    resized, cropped, padded = (load_image(p, 60, fit) for fit in FITS)
    for arr in (resized, cropped, padded):
        _check(arr, 60)
    assert tuple(resized[30, 2]) == (255, 0, 0) and tuple(resized[30, 57]) == (0, 255, 0)
    assert (cropped == (0, 0, 255)).all()
    assert (padded[:15] == 255).all() and (padded[-15:] == 255).all()
    assert tuple(padded[30, 2]) == (255, 0, 0) and tuple(padded[30, 30]) == (0, 0, 255)


def test_shrinking_averages_and_enlarging_interpolates() -> None:
    stripes = np.zeros((96, 96, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: an aliasing trap for point-sampling filters
    small = load_image(stripes, 24)
    inner = small[1:-1, 1:-1]  # border pixels see a one-sided window
    assert abs(float(inner.mean()) - 127.5) < 2 and inner.std() < 1  # stripes averaged to grey, not aliased
    tiny = np.array([[[0, 0, 0], [255, 255, 255]], [[255, 255, 255], [0, 0, 0]]], np.uint8)
    big = load_image(tiny, 32)
    assert len(np.unique(big)) > 8  # interpolated ramps, not two-colour blocks


def test_deterministic_and_source_kinds(tmp_path: Path) -> None:
    im = _pattern(200, 150)
    p = _save(im, tmp_path / "d.jpg", "JPEG", quality=85)
    a = load_image(p, 48)
    assert np.array_equal(a, load_image(p, 48))
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(p.read_bytes())
    assert np.array_equal(a, load_image(copy, 48))
    assert np.array_equal(a, load_image(p.read_bytes(), 48))
    assert np.array_equal(a, load_image(str(p), 48))
    pil = Image.open(p)
    # A caller's image is not drafted (the file decodes at 1/4, 50x38, for a 48 input), hence close, not identical;
    # the sawtooth channel of the pattern is the worst case for that difference.
    assert _mad(a, load_image(pil, 48)) < 5
    assert pil.mode == "RGB" and pil.size == (200, 150)  # caller's image untouched


def test_numpy_inputs() -> None:
    rgb = np.asarray(_pattern(40, 30))
    _check(load_image(rgb, 32))
    assert np.array_equal(np.asarray(open_image(rgb)), rgb)
    gray = rgb[..., 0]
    out = np.asarray(open_image(gray))
    assert out.shape == (30, 40, 3) and np.array_equal(out[..., 2], gray)
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    rgba[:, 20:, 3] = 255
    out = np.asarray(open_image(rgba))
    assert (out[:, :20] == 255).all() and np.array_equal(out[:, 20:], rgb[:, 20:])
    assert np.array_equal(np.asarray(open_image(rgb / 255.0)), rgb)
    assert np.array_equal(np.asarray(open_image(rgb[:, ::-1])), rgb[:, ::-1].copy())  # non-contiguous view
    with pytest.raises(ImageLoadError, match="shape"):
        open_image(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.skipif(not DATA.is_dir(), reason="shared clothing data not available")
def test_real_clothing_photos() -> None:
    files = sorted(DATA.glob("*.jpg"))[:5]
    for f in files:
        assert sniff_format(f) == "JPEG"
        arr = load_image(f, 224, "crop")
        _check(arr, 224)
        assert arr.std() > 5


def test_load_encoded_returns_the_pixels_of_load_image_and_the_stored_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    p = _save(_pattern(400, 300), tmp_path / "r.jpg", "JPEG", exif=exif)
    pixels, stored = load_encoded(p.read_bytes(), 64)
    assert stored == (400, 300)
    np.testing.assert_array_equal(pixels, load_image(p, 64))
    with pytest.raises(ImageLoadError):
        load_encoded(b"not an image at all", 64)
