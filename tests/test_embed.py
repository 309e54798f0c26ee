"""Embedding behaviour with the real default backbone: normalised, stable, robust to orientation and bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.models.embedder import Embedder

from .conftest import skimage_photo


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def test_vectors_are_unit_float32_and_identical_for_identical_bytes(embedder: Embedder, tmp_path: Path) -> None:
    data = _jpeg(skimage_photo("astronaut"))
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "b.jpg").write_bytes(data)
    others = [skimage_photo(n) for n in ("coffee", "rocket", "chelsea")]
    # the same file at different batch positions, between other images
    res = embedder.embed([tmp_path / "a.jpg", *others, tmp_path / "b.jpg"])
    v = res.vectors
    assert v.dtype == np.float32 and v.flags.c_contiguous and v.shape == (5, 1280)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(v[0], v[4])


def test_exif_rotated_jpeg_embeds_like_the_upright_image(embedder: Embedder, tmp_path: Path) -> None:
    upright = skimage_photo("chelsea")
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # pixels stored turned left, the tag says turn them back
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    (tmp_path / "up.jpg").write_bytes(_jpeg(upright))
    (tmp_path / "tagged.jpg").write_bytes(_jpeg(stored, exif=exif.tobytes()))
    (tmp_path / "untagged.jpg").write_bytes(_jpeg(stored))
    v = embedder.embed([tmp_path / "up.jpg", tmp_path / "tagged.jpg", tmp_path / "untagged.jpg"]).vectors
    assert v[0] @ v[1] > 0.99
    assert v[0] @ v[2] < v[0] @ v[1] - 0.1  # without the tag it really is a different picture to the model


def test_edited_copies_are_closer_than_different_photos(embedder: Embedder) -> None:
    photos = {n: skimage_photo(n) for n in ("astronaut", "coffee", "chelsea", "rocket")}
    for name, arr in photos.items():
        im = Image.fromarray(arr)
        small = im.resize((int(im.width * 0.8), int(im.height * 0.8)), Image.BICUBIC)
        v = embedder.embed([arr, Image.open(io.BytesIO(_jpeg(np.asarray(small))))] + [
            a for n, a in photos.items() if n != name]).vectors  # fmt: skip
        assert v[0] @ v[1] > max(v[0] @ v[k] for k in range(2, len(v))) + 0.2, name


def test_bad_inputs_are_reported_not_raised(embedder: Embedder, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(skimage_photo("coffee")).save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    res = embedder.embed([good, tmp_path / "empty.jpg", tmp_path / "text.jpg", tmp_path / "missing.jpg"])
    assert res.vectors.shape == (1, 1280) and res.sources == [good]
    errors = dict((Path(p).name, e) for p, e in res.errors)
    assert set(errors) == {"empty.jpg", "text.jpg", "missing.jpg"}
    assert all("\n" not in e for e in errors.values())


def test_streaming_records_carry_identity_and_errors(embedder: Embedder, tmp_path: Path) -> None:
    paths = []
    for k, name in enumerate(("astronaut", "coffee", "chelsea")):
        p = tmp_path / f"{k}.jpg"
        p.write_bytes(_jpeg(skimage_photo(name)))
        paths.append(str(p))
    (tmp_path / "cut.jpg").write_bytes(Path(paths[0]).read_bytes()[:2000])
    paths.append(str(tmp_path / "cut.jpg"))
    recs = [r for batch in Embedder(embedder.backbone, batch_size=2).embed_files(paths) for r in batch]
    assert [r.path for r in recs] == paths  # input order is kept
    assert all(r.vector is not None and len(r.sha256) == 64 and r.width > 0 for r in recs[:3])
    assert recs[3].vector is None and "truncated" in recs[3].error


def test_pipeline_keeps_order_and_matches_single_calls_across_many_batches(embedder: Embedder, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    paths = []
    for k in range(23):
        p = tmp_path / f"{k:02d}.png"
        Image.fromarray(rng.integers(0, 256, (40 + k, 50, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    e = Embedder(embedder.backbone, batch_size=3)
    recs = [r for batch in e.embed_files(paths) for r in batch]
    assert [r.path for r in recs] == paths
    for r in recs[::5]:
        np.testing.assert_allclose(r.vector, e.embed_one(r.path), rtol=1e-4, atol=1e-5)


def test_a_model_failure_in_the_pipeline_reaches_the_caller(embedder: Embedder, tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    p.write_bytes(_jpeg(skimage_photo("coffee")))
    e = Embedder(embedder.backbone, batch_size=1)

    class Broken:
        num_threads = 1

        def __call__(self, x: np.ndarray) -> np.ndarray:
            raise RuntimeError("engine exploded")

    e.engine = Broken()
    with pytest.raises(RuntimeError, match="engine exploded"):
        list(e.embed_files([str(p)] * 3))


def test_rmac_pooling_runs_through_tflite_like_keras() -> None:
    photos = [skimage_photo(n) for n in ("astronaut", "coffee", "chelsea")]
    lite = Embedder(pooling="rmac")  # the default model: converted once per session, shared with other tests
    assert lite.engine_name.startswith("tflite") and lite.signature()["pooling"] == "rmac"
    v = lite.embed(photos).vectors
    k = Embedder(pooling="rmac", engine="keras").embed(photos).vectors
    np.testing.assert_allclose(np.sum(v * k, axis=1), 1.0, atol=1e-4)
    avg = Embedder(pooling="avg", engine="keras").embed(photos).vectors
    assert np.all(np.sum(v * avg, axis=1) < 0.99)  # a different descriptor, not average pooling renamed


def test_auto_precision_runs_float16_where_native_and_keeps_the_vectors(monkeypatch, tmp_path: Path) -> None:
    from simsearch.api import SimIndex
    from simsearch.errors import IndexMismatchError
    from simsearch.models import tflite_exec

    photos = [skimage_photo(n) for n in ("astronaut", "coffee", "chelsea", "rocket")] * 2  # 8: a bulk call
    keras_vecs = Embedder(engine="keras").embed(photos).vectors
    if tflite_exec.native_fp16():
        auto = Embedder(precision="auto")
        assert auto.precision == "fp16" and auto.engine_name == "tflite-fp16"
        assert np.sum(auto.embed(photos).vectors * keras_vecs, axis=1).min() >= 0.998
        assert auto.engine_name == "tflite-fp16-native"
    # an fp16 index still answers on the Keras engine (float32 arithmetic, the same vectors within 0.002)
    assert Embedder(precision="fp16", engine="keras").precision == "fp16"
    from simsearch.errors import BadInputError

    with pytest.raises(BadInputError, match="int8"):
        Embedder(precision="int8", engine="keras")
    monkeypatch.setenv("SIMSEARCH_NATIVE_FP16", "0")
    tflite_exec.native_fp16.cache_clear()
    try:
        with SimIndex.create(tmp_path / "idx") as idx:  # a new index defaults to auto: fp32 without native fp16
            assert idx.store.signature["precision"] == "fp32"
            idx.check_backbone({"precision": "auto"})  # auto accepts what the index was built with
            with pytest.raises(IndexMismatchError, match="precision"):
                idx.check_backbone({"precision": "fp16"})
    finally:
        monkeypatch.delenv("SIMSEARCH_NATIVE_FP16")
        tflite_exec.native_fp16.cache_clear()


def test_a_query_with_the_bytes_of_an_indexed_file_gets_its_stored_vector(tmp_path: Path) -> None:
    """Same content, same vector (as a sync does): an exact copy kept elsewhere scores 1.0 against its original,
    whichever arithmetic embedded the index; other bytes are embedded."""
    import shutil

    from simsearch.api import SimIndex

    lib = tmp_path / "lib"
    lib.mkdir()
    for n in ("astronaut", "coffee", "chelsea"):
        (lib / f"{n}.jpg").write_bytes(_jpeg(skimage_photo(n)))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(lib / "coffee.jpg", outside / "copy.jpg")
    Image.fromarray(skimage_photo("coffee")).save(outside / "reencoded.jpg", quality=60)
    with SimIndex.create(tmp_path / "idx") as idx:
        idx.add_folder(lib)
        row = idx.store.row_by_path(str(lib / "coffee.jpg"))
        stored = idx.store.vectors([row.id])[0]
        embedded: list[str] = []
        real = idx.embedder.embed_one
        idx.embedder.embed_one = lambda q: embedded.append(str(q)) or real(q)
        np.testing.assert_array_equal(idx.vector_for(outside / "copy.jpg"), stored)
        assert idx.search(str(outside / "copy.jpg"), k=1)[0].score == 1.0
        assert embedded == []  # known content: looked up, not embedded
        assert not np.array_equal(idx.vector_for(outside / "reencoded.jpg"), stored)
        assert embedded == [str(outside / "reencoded.jpg")]
