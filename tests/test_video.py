"""Videos: sampled, indexed by frame, found by a grabbed frame with its time, deduplicated by aligned frames."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.images import open_image, sniff_format
from simsearch.media.video import sample_frames, sniff_video

from .conftest import skimage_photo
from .media_util import reencode, write_clip
from .test_dedup_actions import run_json

pytest.importorskip("av")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.mp4 (four shots, 20 s) and its copies; b.mp4 shares only a's first shot (its intro); two photos."""
    d = tmp_path_factory.mktemp("videos")
    lib = d / "library"
    lib.mkdir()
    pics = {
        n: skimage_photo(n)
        for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "retina", "hubble_deep_field")
    }
    a = write_clip(lib / "a.mp4", [pics["astronaut"], pics["coffee"], pics["chelsea"], pics["rocket"]], 20, zoom=0.3)
    reencode(a, lib / "a-half.mkv", scale=0.5, gop=60)
    reencode(a, lib / "a-trim.mp4", start=5, end=15, gop=37)
    reencode(a, lib / "a-mpeg4.avi", codec="mpeg4", gop=12)
    write_clip(lib / "b.mp4", [pics["astronaut"], pics["camera"], pics["retina"], pics["hubble_deep_field"]], 20,
               zoom=0.3)  # fmt: skip
    Image.fromarray(pics["coffee"]).save(lib / "coffee.jpg", quality=90)
    Image.fromarray(pics["camera"]).save(lib / "camera.jpg", quality=90)
    (lib / "truncated.mp4").write_bytes(a.read_bytes()[:3000])
    (lib / "garbage.mov").write_bytes(b"\x00\x00\x00\x18ftypqt  \x00\x00\x02\x00qt  " + bytes(4000))
    return d


@pytest.fixture(scope="module")
def indexed(clips: Path) -> tuple[Path, Path, dict]:
    index = clips / "idx"
    rep = run_json("index", clips / "library", "--index", index)
    return clips / "library", index, rep


def test_sniffing_tells_videos_from_images_in_the_same_container(clips: Path) -> None:
    lib = clips / "library"
    for name in ("a.mp4", "a-half.mkv", "a-mpeg4.avi"):
        assert sniff_format(lib / name) == "VIDEO"
    assert sniff_format(lib / "coffee.jpg") == "JPEG"
    assert not sniff_video(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(40))
    assert not sniff_video(b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00avifmif1" + bytes(40))
    assert sniff_video(b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(32))


def test_sampling_keyframes_or_a_grid_with_cuts(tmp_path: Path) -> None:
    pics = [skimage_photo("astronaut"), skimage_photo("coffee")]
    short_gop = write_clip(tmp_path / "short.mp4", pics, 12, gop=25)  # a keyframe every second
    info, frames = sample_frames(short_gop)
    assert info.width == 320 and abs(info.duration_s - 12) < 0.1 and info.codec == "h264"
    times = [t for t, _ in frames]
    assert times[0] == 0 and max(np.diff(times)) <= 2.0 + 1e-6 and len(times) <= 13
    long_gop = write_clip(tmp_path / "long.mp4", pics, 12, gop=300)  # keyframes at 0 and at the cut (6 s) only
    _, frames = sample_frames(long_gop, every=2.5)  # further apart than 1.5 x 2.5 s: decoded whole, on a grid
    times = [round(t, 2) for t, _ in frames]
    assert np.allclose(times[:3], [0.0, 2.5, 5.0], atol=0.04) and 6.0 in times  # the grid, to the frame, and the cut
    assert max(np.diff(times)) <= 2.5 + 0.04
    _, few = sample_frames(long_gop, every=0.5, max_frames=5)
    assert len(few) == 5 and few[0][0] == 0.0 and few[-1][0] > 9  # 12 s / 5 frames: one every 2.4 s


def test_corrupt_videos_are_skipped_and_reported(indexed: tuple[Path, Path, dict]) -> None:
    lib, index, rep = indexed
    skipped = {Path(s["path"]).name: s["error"] for s in rep["skipped"]}
    assert set(skipped) == {"truncated.mp4", "garbage.mov"} and all("video" in e for e in skipped.values())
    assert rep["added"] == 7


def test_a_grabbed_frame_finds_its_video_and_the_time(indexed: tuple[Path, Path, dict], tmp_path: Path) -> None:
    lib, index, _ = indexed
    import av

    with av.open(str(lib / "b.mp4")) as c:
        frame = next(f for f in c.decode(video=0) if f.time >= 13.3)
    grab = tmp_path / "grab.png"
    frame.to_image().save(grab)
    (hit, *rest) = run_json("query", grab, "--index", index, "-k", "10")["results"][0]["matches"]
    assert Path(hit["path"]).name == "b.mp4" and abs(hit["time_s"] - 13.3) <= 1.5
    assert "time_s" not in next(m for m in rest if m["path"].endswith(".jpg"))  # photos carry no time
    assert len({m["path"] for m in [hit, *rest]}) == 1 + len(rest)  # one match per video


def test_video_copies_are_grouped_and_an_intro_alone_is_not(indexed: tuple[Path, Path, dict]) -> None:
    lib, index, _ = indexed
    groups = run_json("dedup", "--index", index)["groups"]
    (g,) = [g for g in groups if any(f.endswith(".mp4") for f in g["files"])]
    assert g["kind"] == "near"
    # kept: full size and full length as a.mp4, and the highest bit rate (the MPEG-4 copy was made at 600 kb/s)
    assert [Path(f).name for f in g["files"]][0] == "a-mpeg4.avi"
    assert sorted(Path(f).name for f in g["files"]) == ["a-half.mkv", "a-mpeg4.avi", "a-trim.mp4", "a.mp4"]
    assert not any(f.endswith("b.mp4") for g in groups for f in g["files"])
    assert not any(f.endswith(".jpg") for g in groups for f in g["files"])  # a frame is not a photo's duplicate


def test_query_by_video_finds_its_copies(indexed: tuple[Path, Path, dict], tmp_path: Path) -> None:
    lib, index, _ = indexed
    outside = reencode(lib / "a.mp4", tmp_path / "a-clip.mp4", start=8, end=14, scale=0.75)
    matches = run_json("query", outside, "--index", index)["results"][0]["matches"]
    names = [Path(m["path"]).name for m in matches]
    assert set(names[:4]) == {"a.mp4", "a-half.mkv", "a-trim.mp4", "a-mpeg4.avi"}
    a = matches[names.index("a.mp4")]
    assert a["score"] > 0.8 and abs(a["time_s"] - 8) <= 1.5  # where the clip starts in a.mp4
    assert "b.mp4" not in names[:4]


def test_moved_video_keeps_its_frames_and_has_a_poster(clips: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(clips / "library" / "b.mp4", lib / "b.mp4")
    index = tmp_path / "idx"
    run_json("index", lib, "--index", index)
    (lib / "sub").mkdir()
    (lib / "b.mp4").rename(lib / "sub" / "b-moved.mp4")
    rep = run_json("index", lib, "--index", index)
    assert rep["moved"] == 1 and rep["embedded"] == 0
    r = run_json("query", lib / "sub" / "b-moved.mp4", "--index", index)["results"][0]["matches"]
    assert r[0]["path"].endswith("b-moved.mp4") and r[0]["score"] == 1.0
    poster = open_image(lib / "sub" / "b-moved.mp4", target=100)
    assert poster.size[1] >= 75 and poster.mode == "RGB"


def test_more_like_an_indexed_video_by_id_aligns_its_stored_frames(indexed: tuple[Path, Path, dict]) -> None:
    from simsearch import SimIndex

    lib, index, _ = indexed
    with SimIndex.open(index) as idx:
        row = idx.store.row_by_path(str(lib / "a-half.mkv"))
        hits = idx.search(row.id, k=5)
    assert hits[0].id == row.id and hits[0].score == pytest.approx(1.0)
    assert {Path(h.path).name for h in hits[1:4]} == {"a.mp4", "a-trim.mp4", "a-mpeg4.avi"}
    assert all(h.time_s is not None for h in hits)


def test_the_server_shows_a_videos_matched_frame(indexed: tuple[Path, Path, dict]) -> None:
    from fastapi.testclient import TestClient

    from simsearch.serve.app import create_app

    lib, index, _ = indexed
    c = TestClient(create_app(index, warm_up=False), base_url="http://127.0.0.1")
    vid = next(
        m for m in c.get("/api/search", params={"id": 1, "k": 20}).json()["matches"] if m["path"].endswith("b.mp4")
    )
    poster = c.get(f"/api/images/{vid['id']}/thumbnail", params={"size": 64})
    later = c.get(f"/api/images/{vid['id']}/thumbnail", params={"size": 64, "t": 12.0})
    assert poster.status_code == later.status_code == 200 and poster.headers["content-type"] == "image/jpeg"
    a, b = (np.asarray(Image.open(io.BytesIO(r.content))).astype(float) for r in (poster, later))
    assert a.shape == b.shape and np.abs(a - b).mean() > 20  # another shot of the video: another picture
    assert c.get(f"/api/images/{vid['id']}/thumbnail", params={"t": -1}).status_code == 400


def test_a_videos_frames_survive_the_ray_columns() -> None:
    from simsearch.index.distributed import columns_to_records, records_to_columns
    from simsearch.models.embedder import FileRecord

    frames = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    video = FileRecord("v.mp4", 10, 1, "ab", 320, 240, frames.mean(0), frame_times=[0.0, 2.0, 4.0], frames=frames,
                       video={"duration": 5.0})  # fmt: skip
    photo = FileRecord("p.jpg", 5, 1, "cd", 4, 4, frames[0])
    back = columns_to_records(records_to_columns([video, photo], 8))
    assert back[0].frame_times == [0.0, 2.0, 4.0] and np.array_equal(back[0].frames, frames)
    assert back[0].video == {"duration": 5.0} and back[1].frames is None and back[1].frame_times is None
