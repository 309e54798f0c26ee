"""Camera RAW, HEIC and AVIF twins of JPEG photos: how many does dedup group with their JPEG, and at what cost.

For N photos of ../shared/data/clothing/images, the folder gets the JPEG and one twin of it: a DNG (a Bayer mosaic of
the same pixels, developed by LibRaw when indexed; every third one also carries an embedded preview, as camera files
do), an HEIC at quality 70 or an AVIF at quality 60, in turn. Printed: the share of twins of each kind in a group with
their JPEG (pair recall), and in a copy group (not "similar": another shot), false pairs, and the indexing time.

    python benchmarks/formats.py [PHOTOS] [--photos 150] [--work /tmp/formats-bench]
"""

from __future__ import annotations

import argparse
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

from tests.media_util import write_dng  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "clothing" / "images"
KINDS = ("dng", "heic", "avif")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", type=Path, nargs="?", default=SHARED)
    ap.add_argument("--photos", dest="n", type=int, default=150)
    ap.add_argument("--work", type=Path, default=Path("/tmp/formats-bench"))
    args = ap.parse_args()
    import pillow_heif

    pillow_heif.register_heif_opener()
    shutil.rmtree(args.work, ignore_errors=True)
    lib = args.work / "library"
    lib.mkdir(parents=True)
    files = sorted(args.photos.glob("*.jpg"))[: args.n]
    twins: dict[str, str] = {}
    for i, src in enumerate(files):
        kind = KINDS[i % 3]
        rgb = np.asarray(Image.open(src).convert("RGB"))
        shutil.copy(src, lib / src.name)
        twin = lib / f"{src.stem}.{kind}"
        if kind == "dng":
            preview = rgb[::2, ::2].copy() if i % 9 == 0 else None
            write_dng(rgb, twin, preview=preview)
        else:
            Image.fromarray(rgb).save(twin, quality=70 if kind == "heic" else 60)
        twins[twin.name] = src.name
    t0 = time.perf_counter()
    rep = cli_json("index", lib, "--index", args.work / "idx")
    wall = time.perf_counter() - t0
    groups = cli_json("dedup", "--index", args.work / "idx")["groups"]
    pairs = {frozenset(p) for g in groups for p in combinations([Path(f).name for f in g["files"]], 2)}
    copies = {frozenset(p) for g in groups if g["kind"] != "similar"
              for p in combinations([Path(f).name for f in g["files"]], 2)}  # fmt: skip
    want = {frozenset((t, j)) for t, j in twins.items()}
    print(f"{len(files)} JPEGs + {len(twins)} twins indexed in {wall:.1f} s ({rep['added']} added, "
          f"{len(rep['skipped'])} skipped); false pairs: {len(pairs - want)}")  # fmt: skip
    print(f"{'twin':<6}{'grouped with its JPEG':>24}{'as a copy':>22}")
    for kind in (*KINDS, "all"):
        mine = {frozenset((t, j)) for t, j in twins.items() if kind == "all" or t.endswith(kind)}
        g, c = len(mine & pairs), len(mine & copies)
        print(f"{kind:<6}{g:>14} of {len(mine):<4} ({g / len(mine):.3f}){c:>10} ({c / len(mine):.3f})")


if __name__ == "__main__":
    main()
