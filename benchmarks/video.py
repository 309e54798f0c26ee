"""Video search and dedup on generated clips: copies found, intros not grouped, frames found with their time, speed.

Clips are made from photos (default: ../shared/data/clothing/images): each pans and zooms over 4 photos, cutting
between them. Every base clip gets four copies: re-encoded with another GOP, half size in Matroska, trimmed (a middle
part of 40-70 %), and MPEG-4 in AVI. Some clips share only their first shot (an intro) with a base clip. Measured:
- dedup: pair recall and precision over video pairs, and how many intro-sharing clips were grouped;
- a frame grabbed from the middle of each base clip: is the first match that clip (or a copy), with `time_s` within
  1.5 s of the frame's time in the matched video;
- speed: seconds of video indexed per second of wall time and frames embedded per second (the whole `index`), and
  the sampler alone on 1280x720 clips with a phone-like GOP (keyframes) and a long GOP (full decode).

    python benchmarks/video.py [PHOTOS] [--clips 20] [--size 640x360] [--work /tmp/video-bench]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from child_rss import cli_json  # noqa: E402

from tests.media_util import reencode, write_clip  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "clothing" / "images"


def photos(folder: Path, n: int, rng: random.Random) -> list[np.ndarray]:
    files = sorted(folder.glob("*.jpg"))
    return [np.asarray(Image.open(p).convert("RGB")) for p in rng.sample(files, n)]


def make_library(lib: Path, pics: list[np.ndarray], n: int, size: tuple[int, int], rng: random.Random) -> dict:
    """Base clips, their copies and intro-sharing clips; returns {base: {"copies": {name: offset_s}, "len": s}}."""
    truth: dict[str, dict] = {}
    k = 0
    for i in range(n):
        shots, k = pics[k : k + 4], k + 4
        seconds = rng.choice([16, 20, 24])
        base = write_clip(lib / f"clip{i:02d}.mp4", shots, seconds, size=size, zoom=0.3)
        start = round(rng.uniform(0.15, 0.3) * seconds, 2)
        end = round(start + rng.uniform(0.4, 0.7) * seconds, 2)
        reencode(base, lib / f"clip{i:02d}-gop.mp4", gop=rng.choice([12, 37, 60]))
        reencode(base, lib / f"clip{i:02d}-half.mkv", scale=0.5)
        reencode(base, lib / f"clip{i:02d}-trim.mp4", start=start, end=end)
        reencode(base, lib / f"clip{i:02d}-mpeg4.avi", codec="mpeg4", gop=25)
        truth[base.name] = {"len": seconds, "copies": {base.name: 0.0, f"clip{i:02d}-gop.mp4": 0.0,
                            f"clip{i:02d}-half.mkv": 0.0, f"clip{i:02d}-trim.mp4": start,
                            f"clip{i:02d}-mpeg4.avi": 0.0}}  # fmt: skip
        if i < max(1, n // 2):
            intro = [shots[0], *pics[k : k + 3]]
            k += 3
            write_clip(lib / f"intro{i:02d}.mp4", intro, seconds, size=size, zoom=0.3)
    return truth


def grab(path: Path, t: float, out: Path) -> float:
    import av

    with av.open(str(path)) as c:
        frame = next(f for f in c.decode(video=0) if f.time >= t)
        frame.to_image().save(out)
        return float(frame.time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", type=Path, nargs="?", default=SHARED)
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/video-bench"))
    args = ap.parse_args()
    if not args.photos.is_dir():
        raise SystemExit(f"no photos at {args.photos}")
    rng = random.Random(args.seed)
    size = tuple(int(x) for x in args.size.split("x"))
    shutil.rmtree(args.work, ignore_errors=True)
    lib = args.work / "library"
    lib.mkdir(parents=True)
    t0 = time.perf_counter()
    truth = make_library(lib, photos(args.photos, args.clips * 6 + 8, rng), args.clips, size, rng)  # type: ignore[arg-type]
    print(f"made {len(list(lib.iterdir()))} clips in {time.perf_counter() - t0:.1f} s ({args.size})")

    from simsearch.media.video import probe

    total_s = sum(probe(p).duration_s for p in lib.iterdir())
    index = args.work / "idx"
    t0 = time.perf_counter()
    rep = cli_json("index", lib, "--index", index)
    wall = time.perf_counter() - t0
    from simsearch.index.store import IndexStore
    from simsearch.index.videos import frames_file

    with IndexStore.open(index) as store:
        frames = frames_file(store).slots - 1
    print(f"index: {rep['added']} videos, {total_s:.0f} s of video in {wall:.1f} s wall: "
          f"{total_s / wall:.1f}x real time, {frames} frames ({frames / wall:.1f} frames/s)")  # fmt: skip

    t0 = time.perf_counter()
    groups = cli_json("dedup", "--index", index)["groups"]
    dedup_s = time.perf_counter() - t0
    found = {frozenset(pair) for g in groups for pair in combinations([Path(f).name for f in g["files"]], 2)}
    want = {frozenset(pair) for t in truth.values() for pair in combinations(t["copies"], 2)}
    tp = len(found & want)
    intro_grouped = sum(any(Path(f).name.startswith("intro") for f in g["files"]) for g in groups)
    print(f"dedup ({dedup_s:.1f} s): pair recall {tp / len(want):.3f}, precision {tp / max(1, len(found)):.3f} "
          f"({tp} of {len(want)} pairs, {len(found) - tp} false); groups holding an intro-sharing clip: "
          f"{intro_grouped}")  # fmt: skip

    ok = 0
    errs = []
    for base, t in truth.items():
        at = grab(lib / base, rng.uniform(0.3, 0.7) * t["len"], args.work / "grab.png")
        hit = cli_json("query", args.work / "grab.png", "--index", index, "-k", "3")["results"][0]["matches"][0]
        name = Path(hit["path"]).name
        if name in t["copies"]:
            err = abs(hit.get("time_s", -99) - (at - t["copies"][name]))
            errs.append(err)
            ok += err <= 1.5
    print(f"frame grabs: {ok} of {len(truth)} found their clip first with time_s within 1.5 s "
          f"(median error {np.median(errs) if errs else float('nan'):.2f} s)")  # fmt: skip

    from simsearch.media.video import sample_frames

    hd = args.work / "hd"
    hd.mkdir()
    pics = photos(args.photos, 8, rng)
    for name, gop in (("phone-gop30", 30), ("long-gop300", 300)):
        clip = write_clip(hd / f"{name}.mp4", pics[:4] if gop == 30 else pics[4:], 30, fps=30, size=(1280, 720),
                          gop=gop, zoom=0.3)  # fmt: skip
        t0 = time.perf_counter()
        info, fr = sample_frames(clip)
        s = time.perf_counter() - t0
        print(f"sampler, 1280x720 30 fps {name}: {info.duration_s:.0f} s in {s:.2f} s ({info.duration_s / s:.0f}x "
              f"real time), {len(fr)} frames")  # fmt: skip


if __name__ == "__main__":
    main()
